"""Benchmark prompt sets: UniGenBench (CSV), GenEval (jsonl), OCR (txt), the shapes world, or any file.

Every benchmark becomes a list of `Item(key, prompt, metadata)`. `key` names the item's
images (`{key}_{j}.png`): UniGenBench's own `index`, otherwise the zero-based position in
the file. Metadata carries what scoring needs: UniGenBench testpoints and their
descriptions, GenEval records (tag, include, exclude), the OCR target text (`ocr_text`,
which the OCR reward reads).

Files are read from where the user keeps them (`--prompts PATH`, `--data-dir DIR` or the
FLOWGRPO_DATA environment variable); nothing is bundled. Columns and fields are checked and
a bad file fails with the row and the fix, never with a KeyError deep in scoring.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


class EvalError(ValueError):
    """Bad benchmark input (a missing file, column or field), with what to do about it."""


@dataclass
class Item:
    key: str  # file-name stem of its images: f"{key}_{j}.png"
    prompt: str
    metadata: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str  # unigenbench | geneval | ocr | shapes | prompts
    source: str  # the file read, or a description
    items: list[Item]
    images_per_prompt: int  # the benchmark's convention (UniGenBench and GenEval: 4)


# ---- UniGenBench: 27 sub-dimensions in 10 primary dimensions --------------------------------
# Primary = the part of the testpoint name before " - "; "Text Generation" is reported as "Text"
# (UniGenBench's tables). Definitions are ours: they tell the judge what each testpoint checks.
SUBDIMENSIONS: dict[str, str] = {
    "Style": "the requested art, painting, photography or design style, or the named artist's manner",
    "World Knowledge": "real-world knowledge depicted correctly: landmarks, well-known people and objects, "
                       "cultural and domain facts",
    "Attribute - Color": "the stated colours of the named entities",
    "Attribute - Shape": "the stated shapes of the named entities",
    "Attribute - Size": "the stated size, height, length, width or thickness, absolute or relative",
    "Attribute - Material": "the stated materials and surface textures",
    "Attribute - Expression": "a facial expression that clearly conveys the stated emotion",
    "Attribute - Quantity": "the exact number of each counted entity (hard from three upwards)",
    "Action - Full-body (Character/Anthropomorphic)": "whole-body poses and movements of people or "
                                                      "anthropomorphic characters",
    "Action - Hand (Character/Anthropomorphic)": "the stated hand action, with well-formed hands "
                                                 "(no missing, extra, broken or fused fingers)",
    "Action - Animal": "the action the prompt gives an animal",
    "Action - Contact Interaction": "entities touching or physically acting on each other as stated",
    "Action - Non-contact Interaction": "interaction without touch, such as eye contact, pointing at or "
                                        "talking to another entity",
    "Action - State": "a sustained state of an entity expressed by a verb (sleeping, floating, burning)",
    "Relationship - Comparison": "a stated comparison of an attribute between entities (taller than, darker than)",
    "Relationship - Composition": "an entity made of, or assembled from, other entities",
    "Relationship - Inclusion": "one entity inside, or on, another container or surface (a picture within "
                                "the picture counts)",
    "Relationship - Similarity": "a stated resemblance between different entities",
    "Compound - Imagination": "impossible or fantastical combinations shown as described",
    "Compound - Feature Matching": "each entity carries its own stated features, none swapped or leaked to "
                                   "another entity",
    "Grammar - Negation": "what the prompt says is absent, or not happening, is indeed absent",
    "Grammar - Pronoun Reference": "attributes and actions attach to the entity a pronoun refers to",
    "Grammar - Consistency": "an attribute the prompt gives to several entities is shared by all of them",
    "Entity Layout - Two-Dimensional Space": "positions in the picture plane (left, right, above, below, around)",
    "Entity Layout - Three-Dimensional Space": "arrangement in depth (in front of, behind, near, far)",
    "Logical Reasoning": "the result the prompt's logic implies (cause and effect, intent), not only its "
                         "literal words",
    "Text Generation": "the requested text rendered exactly, with no missing, extra or wrong characters",
}
PRIMARY_DIMENSIONS = ("Style", "World Knowledge", "Attribute", "Action", "Relationship", "Compound", "Grammar",
                      "Entity Layout", "Logical Reasoning", "Text")
_PRIMARY_RENAMES = {"Text Generation": "Text"}


def primary_of(testpoint: str) -> str:
    """'Attribute - Color' -> 'Attribute'; 'Style' -> 'Style'; 'Text Generation' -> 'Text'."""
    head = testpoint.split(" - ", 1)[0].strip()
    return _PRIMARY_RENAMES.get(head, head)


def subdimension_map() -> dict[str, str]:
    """The 27 sub-dimensions -> their primary dimension."""
    return {name: primary_of(name) for name in SUBDIMENSIONS}


# ---- data files -----------------------------------------------------------------------------
# Where each named benchmark's file sits below a data directory (the layout `flowgrpo data fetch`
# writes under data/, which mirrors the upstream repositories).
NAMED_FILES = {
    "unigenbench": ("unigenbench/test_prompts_en.csv",
                    "the UniGenBench test CSV (github.com/CodeGoat24/UniGenBench, data/test_prompts_en.csv)"),
    "geneval": ("flow_grpo/geneval/test_metadata.jsonl",
                "GenEval metadata (github.com/yifan123/flow_grpo, dataset/geneval/test_metadata.jsonl)"),
    "ocr": ("flow_grpo/ocr/test.txt", "the OCR prompts (github.com/yifan123/flow_grpo, dataset/ocr/test.txt)"),
}
DEFAULT_IMAGES = {"unigenbench": 4, "geneval": 4, "ocr": 1, "shapes": 4, "prompts": 1}


def _data_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get("FLOWGRPO_DATA"):
        dirs.append(Path(os.environ["FLOWGRPO_DATA"]))
    dirs.append(Path("data"))
    return dirs


def _find_named(name: str, data_dir: str | Path | None) -> Path:
    rel, what = NAMED_FILES[name]
    tried = []
    for d in _data_dirs(data_dir):
        for cand in (d / rel, d / Path(rel).relative_to(Path(rel).parts[0]), d / Path(rel).name):
            tried.append(str(cand))
            if cand.is_file():
                return cand
    raise EvalError(f"benchmark {name!r} needs {what}; pass its path with --prompts PATH, or put it under "
                    f"--data-dir DIR / $FLOWGRPO_DATA as {rel} (looked for {', '.join(tried[:3])}, ...)")


def load_benchmark(name_or_path: str, data_dir: str | Path | None = None, prompts: str | Path | None = None,
                   limit: int | None = None) -> Benchmark:
    """A named benchmark (unigenbench, geneval, ocr, shapes) or a prompt FILE (.txt, .jsonl, .csv).

    `prompts` overrides where a named benchmark's file is read from; `limit` keeps the first N items.
    """
    if name_or_path == "shapes":
        from ..worlds.shapes.grammar import split_records

        items = [Item(str(i), r["prompt"], dict(r)) for i, r in enumerate(split_records()["test"])]
        bench = Benchmark("shapes", "flowgrpo.worlds.shapes.grammar split_records()['test']", items, 4)
    elif name_or_path in NAMED_FILES:
        path = Path(prompts) if prompts else _find_named(name_or_path, data_dir)
        if not path.is_file():
            raise EvalError(f"prompt file {str(path)!r} does not exist")
        loader = {"unigenbench": load_unigenbench_csv, "geneval": load_geneval_jsonl, "ocr": load_ocr_txt}
        bench = Benchmark(name_or_path, str(path), loader[name_or_path](path), DEFAULT_IMAGES[name_or_path])
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise EvalError(f"benchmark {name_or_path!r} is neither a known name (unigenbench, geneval, ocr, "
                            f"shapes) nor an existing prompt file (.txt, .jsonl, .csv)")
        bench = load_prompt_file(path)
    if limit is not None:
        if limit < 1:
            raise EvalError(f"--limit must be at least 1, got {limit}")
        bench.items = bench.items[:limit]
    if not bench.items:
        raise EvalError(f"benchmark {bench.source!r} has no prompts")
    return bench


def load_prompt_file(path: str | Path) -> Benchmark:
    """Any prompt file: .txt (one a line), .jsonl (objects with "prompt"), .csv (a prompt column)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        items = [Item(str(i), p) for i, p in enumerate(_txt_lines(path))]
        return Benchmark("prompts", str(path), items, DEFAULT_IMAGES["prompts"])
    if suffix == ".jsonl":
        recs = _jsonl_records(path)
        if all("include" in r for r in recs):
            return Benchmark("geneval", str(path), load_geneval_jsonl(path), DEFAULT_IMAGES["geneval"])
        items = [Item(str(i), r["prompt"], {k: v for k, v in r.items() if k != "prompt"}) for i, r in enumerate(recs)]
        return Benchmark("prompts", str(path), items, DEFAULT_IMAGES["prompts"])
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if "sub_dims_en" in header:
            return Benchmark("unigenbench", str(path), load_unigenbench_csv(path), DEFAULT_IMAGES["unigenbench"])
        col = next((c for c in ("prompt", "prompt_en") if c in header), None)
        if col is None:
            raise EvalError(f"{path}: a prompt CSV needs a 'prompt' (or 'prompt_en') column; found {header}")
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        items = [Item(str(i), r[col].strip()) for i, r in enumerate(rows) if r[col] and r[col].strip()]
        return Benchmark("prompts", str(path), items, DEFAULT_IMAGES["prompts"])
    raise EvalError(f"{path}: unsupported prompt file type {suffix!r}; use .txt, .jsonl or .csv")


def _txt_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _jsonl_records(path: Path) -> list[dict]:
    from ..data import PromptFileError, read_jsonl_prompts

    try:
        recs = read_jsonl_prompts(path)
    except PromptFileError as exc:
        raise EvalError(str(exc)) from None
    for n, rec in enumerate(recs, 1):
        if not rec["prompt"].strip():
            raise EvalError(f"{path}: record {n} has an empty \"prompt\"")
    return recs


UNIGENBENCH_COLUMNS = ("index", "prompt_en", "sub_dims_en")


def load_unigenbench_csv(path: str | Path, strict_testpoints: bool = True) -> list[Item]:
    """UniGenBench's CSV: index, prompt_en, sub_dims_en (JSON with "Testpoints" and
    "Testpoint Description", equally long). Unknown testpoint names are an error unless
    `strict_testpoints=False` (they then keep their prefix as primary dimension)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in UNIGENBENCH_COLUMNS if c not in header]
        if missing:
            raise EvalError(f"{path}: missing column(s) {missing}; a UniGenBench CSV has columns "
                            f"{list(UNIGENBENCH_COLUMNS)} (the English test set, data/test_prompts_en.csv); "
                            f"found {header}")
        rows = list(reader)
    items, seen = [], set()
    for line, row in enumerate(rows, 2):
        where = f"{path}: row {line - 1} (index {row['index']!r})"
        key = (row["index"] or "").strip()
        if not re.fullmatch(r"[0-9A-Za-z_.-]+", key):
            raise EvalError(f"{where}: index must be a plain name or number (it names the image files)")
        if key in seen:
            raise EvalError(f"{where}: index {key} appears twice")
        seen.add(key)
        prompt = (row["prompt_en"] or "").strip()
        if not prompt:
            raise EvalError(f"{where}: empty prompt_en")
        try:
            dims = json.loads(row["sub_dims_en"] or "")
        except json.JSONDecodeError as exc:
            raise EvalError(f"{where}: sub_dims_en is not valid JSON ({exc.msg} at character {exc.pos}); "
                            f"fix that row of the file") from None
        points, descs = dims.get("Testpoints") if isinstance(dims, dict) else None, None
        if isinstance(dims, dict):
            descs = dims.get("Testpoint Description")
        if not isinstance(points, list) or not points or not all(isinstance(p, str) for p in points):
            raise EvalError(f"{where}: sub_dims_en needs a non-empty \"Testpoints\" list of names")
        if not isinstance(descs, list) or len(descs) != len(points):
            raise EvalError(f"{where}: \"Testpoint Description\" must list one description per testpoint "
                            f"({len(points)} testpoints)")
        unknown = [p for p in points if p not in SUBDIMENSIONS]
        if unknown and strict_testpoints:
            raise EvalError(f"{where}: unknown testpoint(s) {unknown}; known: {sorted(SUBDIMENSIONS)}")
        items.append(Item(key, prompt, {
            "testpoints": points, "descriptions": [str(d) for d in descs],
            "primary_category": dims.get("Primary Categories"), "secondary_category": dims.get("Secondary Categories"),
            "subjects": dims.get("Subjects"), "sentence_structure": dims.get("Sentence Structure")}))
    return items


def load_geneval_jsonl(path: str | Path) -> list[Item]:
    """GenEval metadata: one object a line with "prompt", "tag" and an "include" list of
    {class, count, color?, position?: [relation, index]} (and optional "exclude")."""
    path = Path(path)
    items = []
    for i, rec in enumerate(_jsonl_records(path)):
        where = f"{path}: record {i + 1} ({rec['prompt']!r})"
        if not isinstance(rec.get("tag"), str):
            raise EvalError(f"{where}: needs a \"tag\" (single_object, two_object, counting, colors, position, "
                            f"color_attr)")
        inc = rec.get("include")
        if not isinstance(inc, list) or not inc or not all(isinstance(c, dict) and "class" in c for c in inc):
            raise EvalError(f"{where}: needs an \"include\" list of objects with a \"class\" (GenEval schema)")
        items.append(Item(str(i), rec["prompt"].strip(), dict(rec)))
    return items


_QUOTED = re.compile(r'"([^"]+)"')


def ocr_target(prompt: str) -> str | None:
    """The text between the first pair of double quotes (Flow-GRPO's OCR convention)."""
    m = _QUOTED.search(prompt)
    return m.group(1) if m else None


def load_ocr_txt(path: str | Path) -> list[Item]:
    path = Path(path)
    items = []
    for i, prompt in enumerate(_txt_lines(path)):
        target = ocr_target(prompt)
        if target is None:
            raise EvalError(f"{path}: prompt {i + 1} has no target text in double quotes: {prompt[:80]!r}")
        items.append(Item(str(i), prompt, {"ocr_text": target}))
    return items

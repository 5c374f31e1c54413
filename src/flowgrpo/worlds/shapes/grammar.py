"""The shapes world's prompt grammar, in GenEval's phrasing and metadata schema.

Every prompt maps to one GenEval-style metadata record::

    {"tag": "position", "prompt": "a photo of a square left of a circle",
     "include": [{"class": "circle", "count": 1},
                 {"class": "square", "count": 1, "position": ["left of", 0]}]}

`parse_prompt` inverts `make_prompt`, so any prompt in this vocabulary (not only the
shipped split files) can be rendered and verified.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

CLASSES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = ("red", "green", "blue", "yellow")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# Colour-object bindings that never appear in a training prompt: the test split measures
# whether the model composes "red" and "triangle" it has only seen apart.
HELD_OUT_BINDINGS = (("red", "triangle"), ("blue", "circle"))
# Share of the remaining prompts of each tag moved to the test split (by a stable hash).
TEST_FRACTION = 0.25


class GrammarError(ValueError):
    """A prompt or metadata record outside the shapes world's vocabulary."""


def _article_noun(cls: str, color: str | None = None) -> str:
    return f"a {color} {cls}" if color else f"a {cls}"


def make_prompt(record: dict) -> str:
    """The GenEval phrasing of a metadata record."""
    tag, inc = record["tag"], record["include"]
    if tag == "single_object":
        return f"a photo of {_article_noun(inc[0]['class'])}"
    if tag == "colors":
        return f"a photo of {_article_noun(inc[0]['class'], inc[0]['color'])}"
    if tag == "counting":
        n, cls = inc[0]["count"], inc[0]["class"]
        noun = cls if n == 1 else PLURALS[cls]
        return f"a photo of {NUMBERS[n]} {noun}"
    if tag == "two_object":
        return f"a photo of {_article_noun(inc[0]['class'])} and {_article_noun(inc[1]['class'])}"
    if tag == "color_attr":
        a, b = inc
        return f"a photo of {_article_noun(a['class'], a['color'])} and {_article_noun(b['class'], b['color'])}"
    if tag == "position":
        ref, obj = inc
        return f"a photo of {_article_noun(obj['class'])} {obj['position'][0]} {_article_noun(ref['class'])}"
    raise GrammarError(f"unknown tag {tag!r}; expected one of {TAGS}")


def _record(tag: str, include: list, exclude: list | None = None) -> dict:
    rec = {"tag": tag, "include": include}
    if exclude:
        rec["exclude"] = exclude
    rec["prompt"] = make_prompt(rec)
    return rec


def all_records() -> list[dict]:
    """Every prompt of the grammar, in a fixed order."""
    recs = []
    for c in CLASSES:
        recs.append(_record("single_object", [{"class": c, "count": 1}]))
    for c in CLASSES:
        for col in COLORS:
            recs.append(_record("colors", [{"class": c, "count": 1, "color": col}]))
    for c in CLASSES:
        for n in NUMBERS:
            recs.append(_record("counting", [{"class": c, "count": n}], [{"class": c, "count": n + 1}]))
    for a in CLASSES:
        for b in CLASSES:
            if a != b:
                recs.append(_record("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}]))
    for ref in CLASSES:
        for obj in CLASSES:
            if obj == ref:
                continue
            for rel in RELATIONS:
                recs.append(_record("position", [{"class": ref, "count": 1},
                                                 {"class": obj, "count": 1, "position": [rel, 0]}]))
    for a in CLASSES:
        for b in CLASSES:
            if a == b:
                continue
            for ca in COLORS:
                for cb in COLORS:
                    if ca != cb:
                        recs.append(_record("color_attr", [{"class": a, "count": 1, "color": ca},
                                                           {"class": b, "count": 1, "color": cb}]))
    return recs


def bindings(record: dict) -> set[tuple[str, str]]:
    return {(c["color"], c["class"]) for c in record["include"] if c.get("color")}


def _stable_unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_records(held_out: Iterable[tuple[str, str]] = HELD_OUT_BINDINGS,
                  test_fraction: float = TEST_FRACTION) -> dict[str, list[dict]]:
    """Deterministic train/test split.

    Test holds (a) every prompt binding a held-out colour to an object, and (b) a stable
    hashed `test_fraction` of the others per tag. single_object has only three prompts:
    they sit in both splits (evaluated on other seeds), as GenEval's tag would be empty
    otherwise.
    """
    held = set(held_out)
    train, test = [], []
    by_tag: dict[str, list[dict]] = {}
    for rec in all_records():
        by_tag.setdefault(rec["tag"], []).append(rec)
    for tag, recs in by_tag.items():
        if tag == "single_object":
            train += recs
            test += recs
            continue
        held_recs = [r for r in recs if bindings(r) & held]
        rest = sorted((r for r in recs if not bindings(r) & held), key=lambda r: _stable_unit(r["prompt"]))
        n_test = max(1, round(test_fraction * len(rest)))
        test += held_recs + rest[:n_test]
        train += rest[n_test:]
    order = {r["prompt"]: i for i, r in enumerate(all_records())}
    return {"train": sorted(train, key=lambda r: order[r["prompt"]]),
            "test": sorted(test, key=lambda r: order[r["prompt"]])}


_WORD_NUMBERS = {"a": 1, "an": 1, **{v: k for k, v in NUMBERS.items()}}
_SINGULAR = {p: s for s, p in PLURALS.items()} | {s: s for s in CLASSES}


def _noun(text: str, prompt: str) -> tuple[int, str | None, str]:
    m = re.fullmatch(r"(an?|one|two|three|four)\s+(?:(red|green|blue|yellow)\s+)?([a-z]+)", text.strip())
    if not m or m.group(3) not in _SINGULAR:
        raise GrammarError(
            f"prompt {prompt!r} is outside the shapes grammar: cannot read {text!r}; "
            f"classes are {CLASSES}, colours {COLORS}")
    return _WORD_NUMBERS[m.group(1)], m.group(2), _SINGULAR[m.group(3)]


def parse_prompt(prompt: str) -> dict:
    """GenEval metadata for any prompt of the grammar (raises GrammarError otherwise)."""
    text = prompt.strip().lower()
    if not text.startswith("a photo of "):
        raise GrammarError(f"prompt {prompt!r} is outside the shapes grammar: it must start with 'a photo of '")
    body = text[len("a photo of "):]
    rel = re.fullmatch(r"(.+?)\s+(left of|right of|above|below)\s+(.+)", body)
    if rel:
        n1, c1, obj = _noun(rel.group(1), prompt)
        n2, c2, ref = _noun(rel.group(3), prompt)
        if n1 != 1 or n2 != 1 or c1 or c2:
            raise GrammarError(f"prompt {prompt!r}: position prompts take one uncoloured object each")
        return _record("position", [{"class": ref, "count": 1},
                                    {"class": obj, "count": 1, "position": [rel.group(2), 0]}])
    parts = body.split(" and ")
    if len(parts) == 2:
        (n1, c1, a), (n2, c2, b) = _noun(parts[0], prompt), _noun(parts[1], prompt)
        if n1 != 1 or n2 != 1:
            raise GrammarError(f"prompt {prompt!r}: two-object prompts take one object each")
        if c1 and c2:
            return _record("color_attr", [{"class": a, "count": 1, "color": c1},
                                          {"class": b, "count": 1, "color": c2}])
        if c1 or c2:
            raise GrammarError(f"prompt {prompt!r}: colour both objects or neither")
        return _record("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}])
    if len(parts) != 1:
        raise GrammarError(f"prompt {prompt!r} is outside the shapes grammar: at most two objects")
    first = body.split()[0] if body.split() else ""
    n, color, cls = _noun(body, prompt)
    if first in ("a", "an"):
        if color:
            return _record("colors", [{"class": cls, "count": 1, "color": color}])
        return _record("single_object", [{"class": cls, "count": 1}])
    if color:
        raise GrammarError(f"prompt {prompt!r}: counting prompts are uncoloured")
    return _record("counting", [{"class": cls, "count": n}], [{"class": cls, "count": n + 1}])


def validate_record(record: dict) -> dict:
    """Check a metadata record against the vocabulary; returns it or raises GrammarError."""
    if not isinstance(record, dict) or "include" not in record:
        raise GrammarError(f"metadata {record!r} has no 'include' list (GenEval schema)")
    for clause in record["include"] + record.get("exclude", []):
        if clause.get("class") not in CLASSES:
            raise GrammarError(f"class {clause.get('class')!r} is not in the shapes world {CLASSES}")
        if "color" in clause and clause["color"] not in COLORS:
            raise GrammarError(f"colour {clause['color']!r} is not in the shapes world {COLORS}")
        if not isinstance(clause.get("count", 1), int) or clause.get("count", 1) < 1:
            raise GrammarError(f"count {clause.get('count')!r} must be a positive integer")
        if "position" in clause and clause["position"][0] not in RELATIONS:
            raise GrammarError(f"relation {clause['position'][0]!r} is not one of {RELATIONS}")
    return record


def vocabulary() -> list[str]:
    """Every word a prompt of the grammar can use (the text encoders' word-level vocab)."""
    words = {"a", "an", "photo", "of", "and"}
    words |= set(CLASSES) | set(PLURALS.values()) | set(COLORS) | set(NUMBERS.values())
    for r in RELATIONS:
        words |= set(r.split())
    return sorted(words)


def write_jsonl(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

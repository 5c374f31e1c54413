"""Prompt sources for training and evaluation.

A source is a file (txt: one prompt a line; jsonl: objects with "prompt" and any metadata,
e.g. GenEval's schema; csv: a "prompt" or "prompt_en" column) or a built-in split
"shapes:train" / "shapes:test". Every item is {"prompt": str, "metadata": dict}.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch


class PromptFileError(ValueError):
    """An unreadable or malformed prompt file."""


def load_prompts(source: str, tags: list[str] | None = None) -> list[dict]:
    if source.startswith("shapes:"):
        from .worlds.shapes.grammar import split_records

        split = source.split(":", 1)[1]
        splits = split_records()
        if split not in splits:
            raise PromptFileError(f"unknown shapes split {split!r}; use shapes:train or shapes:test")
        items = [{"prompt": r["prompt"], "metadata": r} for r in splits[split]]
    else:
        items = _load_file(Path(source))
    if tags:
        items = [it for it in items if it["metadata"].get("tag") in tags]
        if not items:
            raise PromptFileError(f"no prompts in {source!r} have tags {tags}")
    return items


def read_jsonl_prompts(path: Path, text: str | None = None) -> list[dict]:
    """The objects of a JSONL prompt file, each with a string "prompt" (GenEval's schema fits)."""
    text = path.read_text(encoding="utf-8") if text is None else text
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise PromptFileError(f"{path}:{n}: each line needs a string field 'prompt'")
        records.append(obj)
    return records


def _load_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist (give a .txt, .jsonl or .csv file, "
                              f"or shapes:train / shapes:test)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read prompt file {str(path)!r}: {exc}") from None
    suffix = path.suffix.lower()
    items: list[dict] = []
    if suffix == ".jsonl":
        items = [{"prompt": obj["prompt"], "metadata": obj} for obj in read_jsonl_prompts(path, text)]
    elif suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows:
            raise PromptFileError(f"{path}: no rows")
        col = next((c for c in ("prompt", "prompt_en") if c in rows[0]), None)
        if col is None:
            raise PromptFileError(f"{path}: needs a 'prompt' or 'prompt_en' column; found {list(rows[0])}")
        items = [{"prompt": r[col], "metadata": dict(r)} for r in rows]
    else:
        items = [{"prompt": line.strip(), "metadata": {}} for line in text.splitlines() if line.strip()]
    if not items:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts")
    return items


class TagDraw:
    """data.balance_tags: draw a tag (uniformly, or in data.tag_weights' proportions, a tag left
    out weighing 1), then one of its prompts, from a torch generator."""

    def __init__(self, items: list[dict], weights: dict[str, float]):
        from .config import ConfigError

        by_tag: dict[str, list[dict]] = {}
        for item in items:
            by_tag.setdefault(item["metadata"].get("tag", ""), []).append(item)
        unknown = sorted(set(weights) - set(by_tag))
        if unknown:
            raise ConfigError(f"data.tag_weights names tags with no training prompt: {unknown}; the training "
                              f"prompts' tags are {sorted(by_tag)}")
        self.groups = [by_tag[t] for t in sorted(by_tag)]
        self.weights = (torch.tensor([float(weights.get(t, 1.0)) for t in sorted(by_tag)], dtype=torch.float64)
                        if weights else None)
        if self.weights is not None and not self.weights.sum() > 0:
            raise ConfigError(f"data.tag_weights {dict(weights)} weigh every training tag 0 (a tag left out weighs 1); "
                              "give at least one tag a positive weight")

    def __call__(self, n: int, g: torch.Generator) -> list[dict]:
        if self.weights is not None:
            picks = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
        else:
            picks = torch.randint(len(self.groups), (n,), generator=g).tolist()
        return [self.groups[t][int(torch.randint(len(self.groups[t]), (1,), generator=g))] for t in picks]

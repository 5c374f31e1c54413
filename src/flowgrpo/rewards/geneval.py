"""GenEval over the reward server protocol.

GenEval scores an image against a metadata record (the schema of GenEval's
`evaluation_metadata.jsonl`, which the shapes world shares):

    {"tag": "color_attr" | "counting" | ..., "prompt": "...",
     "include": [{"class": "dog", "count": 1, "color": "pink", "position": ["left of", 0]}, ...],
     "exclude": [{"class": "dog", "count": 2}]}

`strict` is 1 when every clause holds (GenEval's "correct"), `partial` the share of clauses
that hold (the reference's partial-credit reward).

The GenEval protocol is the reward server's protocol (server.py) with two rules: each request
carries one record per image in `metadata`, and the answer's `components` hold per-image
`strict` and `partial`. So a GenEval scorer is any registered reward built on `GenevalScorer`
(implement `evaluate(image, record) -> (strict, partial)`), served with

    flowgrpo serve-reward NAME --import my_geneval_adapter --port 18085

in the environment that has the detector (GenEval's mmdetection + CLIP colour classifier).
`geneval_shapes` is such a scorer for the shapes world, built on its verifier. The client
reward `geneval` (url=...) talks to any of them.
"""

from __future__ import annotations

import numpy as np

from .base import Reward, RewardError, RewardOutput, as_uint8_images, register
from .remote import RemoteReward

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")


def validate_geneval_record(record, index: int = 0) -> dict:
    """Check the GenEval schema (not the vocabulary: that is the scorer's business)."""
    where = f"metadata[{index}]"
    if not isinstance(record, dict) or not isinstance(record.get("include"), list) or not record["include"]:
        raise RewardError(f"{where} is not a GenEval record: it needs a non-empty 'include' list "
                          "(use a GenEval metadata jsonl as the prompt file)")
    clauses = record["include"] + list(record.get("exclude") or [])
    for j, clause in enumerate(clauses):
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
            raise RewardError(f"{where}: clause {j} needs a 'class' string")
        count = clause.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise RewardError(f"{where}: clause {j} count {count!r} must be a positive integer")
        if "color" in clause and not isinstance(clause["color"], str):
            raise RewardError(f"{where}: clause {j} color must be a string")
        pos = clause.get("position")
        if pos is not None:
            if (not isinstance(pos, (list, tuple)) or len(pos) != 2 or pos[0] not in GENEVAL_RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < len(record["include"])):
                raise RewardError(f"{where}: clause {j} position {pos!r} must be [relation, index of an include "
                                  f"clause], relation one of {GENEVAL_RELATIONS}")
    tag = record.get("tag")
    if tag is not None and tag not in GENEVAL_TAGS:
        raise RewardError(f"{where}: tag {tag!r} is not one of {GENEVAL_TAGS}")
    return record


class GenevalScorer(Reward):
    """Server-side base of a GenEval scorer: subclasses implement `evaluate`.

    scores = partial (mode="partial") or strict (mode="strict"); components always carry both.
    """

    kind = "pointwise"

    def __init__(self, mode: str = "partial"):
        if mode not in ("strict", "partial"):
            raise RewardError(f"mode must be strict or partial, got {mode!r}")
        self.mode = mode

    def evaluate(self, image: np.ndarray, record: dict) -> tuple[float, float]:
        """(strict in {0, 1}, partial in [0, 1]) for one uint8 HxWx3 RGB image."""
        raise NotImplementedError

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        images = as_uint8_images(images)
        if metadata is None or len(metadata) != len(images):
            raise RewardError("a GenEval scorer needs one metadata record per image")
        strict, partial = np.zeros(len(images)), np.zeros(len(images))
        for i, (img, rec) in enumerate(zip(images, metadata)):
            s, p = self.evaluate(img, validate_geneval_record(rec, i))
            strict[i], partial[i] = float(s), float(p)
        return RewardOutput(strict if self.mode == "strict" else partial, {"strict": strict, "partial": partial})


class ShapesGenevalScorer(GenevalScorer):
    """The shapes world's verifier as a GenEval scorer (its classes and colours only)."""

    name = "geneval_shapes"

    def evaluate(self, image, record):
        from ..worlds.shapes.grammar import validate_record
        from ..worlds.shapes.verify import score

        verdict = score(image, validate_record(record))
        return verdict.strict, verdict.partial


@register("geneval_shapes")
def _geneval_shapes(mode: str = "partial"):
    return ShapesGenevalScorer(mode)


class GenevalReward(RemoteReward):
    mean_info = ("geneval_strict", "geneval_partial", "geneval_strict/")
    """Client of a remote GenEval scorer. Records are checked here, before any upload.

    info adds `geneval_strict`, `geneval_partial` (batch means) and `geneval_strict/TAG` per tag.
    """

    def __init__(self, url: str, mode: str = "partial", **kwargs):
        if mode not in ("strict", "partial"):
            raise RewardError(f"mode must be strict or partial, got {mode!r}")
        self.mode = mode
        super().__init__(url, **kwargs)

    def refresh(self) -> dict:
        health = super().refresh()
        self.name, self.kind, self.needs_groups = f"geneval_{self.mode}", "pointwise", False
        return health

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        if metadata is None or len(metadata) != len(prompts):
            raise RewardError("the geneval reward needs one GenEval metadata record per image "
                              "(use a GenEval metadata jsonl as the prompt file)")
        for i, rec in enumerate(metadata):
            validate_geneval_record(rec, i)
        out = super().__call__(images, prompts, metadata, group_ids)
        if "strict" not in out.components or "partial" not in out.components:
            raise RewardError(f"{self.url} serves {self.server.get('reward')!r}, which does not answer with GenEval "
                              f"strict/partial components (got {sorted(out.components)}); serve a GenEval scorer, "
                              "e.g. `flowgrpo serve-reward geneval_shapes`")
        strict, partial = out.components["strict"], out.components["partial"]
        info = dict(out.info)
        if len(strict):
            info["geneval_strict"], info["geneval_partial"] = float(np.nanmean(strict)), float(np.nanmean(partial))
        tags = [rec.get("tag") for rec in metadata]
        for tag in sorted({t for t in tags if t}):
            mask = np.asarray([t == tag for t in tags])
            info[f"geneval_strict/{tag}"] = float(np.nanmean(strict[mask]))
        return RewardOutput(strict.copy() if self.mode == "strict" else partial.copy(), out.components, info)


@register("geneval")
def _geneval(url: str = "http://127.0.0.1:18085", mode: str = "partial", **kwargs):
    return GenevalReward(url, mode, **kwargs)

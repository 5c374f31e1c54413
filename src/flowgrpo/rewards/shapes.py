"""The shapes world's verifier as a reward (GenEval's twin: strict 0/1 or partial credit)."""

from __future__ import annotations

import numpy as np

from ..worlds.shapes.grammar import parse_prompt
from ..worlds.shapes.verify import score
from .base import Reward, RewardOutput, as_uint8_images, register


class ShapesVerifierReward(Reward):
    kind = "pointwise"

    def __init__(self, mode: str = "partial"):
        if mode not in ("strict", "partial"):
            raise ValueError(f"mode must be 'strict' or 'partial', got {mode!r}")
        self.mode = mode
        self.name = f"shapes_{mode}"

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        images = as_uint8_images(images)
        strict, partial = [], []
        for i, (img, prompt) in enumerate(zip(images, prompts)):
            rec = metadata[i] if metadata and metadata[i] and "include" in metadata[i] else parse_prompt(prompt)
            v = score(img, rec)
            strict.append(v.strict)
            partial.append(v.partial)
        strict, partial = np.asarray(strict), np.asarray(partial)
        return RewardOutput(strict if self.mode == "strict" else partial, {"strict": strict, "partial": partial})


@register("shapes_strict")
def _strict(**kw):
    return ShapesVerifierReward("strict", **kw)


@register("shapes_partial")
def _partial(**kw):
    return ShapesVerifierReward("partial", **kw)

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
        strict, partial = [], []
        for _, _, v in verified(images, prompts, metadata):
            strict.append(v.strict)
            partial.append(v.partial)
        strict, partial = np.asarray(strict), np.asarray(partial)
        return RewardOutput(strict if self.mode == "strict" else partial, {"strict": strict, "partial": partial})


def verified(images, prompts, metadata=None):
    """(record, detections, verdict) per image: the metadata record when given, else the
    prompt parsed; the verifier's detections and its verdict on them."""
    from ..worlds.shapes.verify import detect

    for i, (img, prompt) in enumerate(zip(as_uint8_images(images), prompts)):
        rec = metadata[i] if metadata and metadata[i] and "include" in metadata[i] else parse_prompt(prompt)
        dets = detect(img)
        yield rec, dets, score(img, rec, detections=dets)


def shape_progress(detections, record: dict) -> float:
    """How close the image is to having each wanted object, even before the verifier accepts
    it: per include clause, the best IoU of any blob with that class's ideal shape (blobs of
    the wanted colour count fully, others half), averaged over clauses."""
    terms = []
    for clause in record["include"]:
        best = 0.0
        for d in detections:
            iou = dict(d.ious).get(clause["class"], 0.0)
            if "color" in clause and d.color != clause["color"]:
                iou *= 0.5
            best = max(best, iou)
        terms.append(best)
    return float(np.mean(terms)) if terms else 0.0


class DenseShapesReward(Reward):
    """partial + `shape_weight` x shape_progress: the verifier's partial credit is zero for a
    blob that is not yet recognisably a shape, so a weak model gets no signal there; the
    progress term rewards blobs for getting closer to the wanted shape and colour."""

    kind = "pointwise"
    name = "shapes_dense"

    def __init__(self, shape_weight: float = 0.5):
        self.shape_weight = shape_weight

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        strict, partial, progress = [], [], []
        for rec, dets, v in verified(images, prompts, metadata):
            strict.append(v.strict)
            partial.append(v.partial)
            progress.append(shape_progress(dets, rec))
        strict, partial, progress = map(np.asarray, (strict, partial, progress))
        return RewardOutput(partial + self.shape_weight * progress,
                            {"strict": strict, "partial": partial, "shape_progress": progress})


@register("shapes_dense")
def _dense(**kw):
    return DenseShapesReward(**kw)


@register("shapes_strict")
def _strict(**kw):
    return ShapesVerifierReward("strict", **kw)


@register("shapes_partial")
def _partial(**kw):
    return ShapesVerifierReward("partial", **kw)


def wanted_objects(record: dict) -> int:
    """How many objects a prompt asks for (the include clauses' counts)."""
    return sum(clause.get("count", 1) for clause in record["include"])


def drawing_quality(detections, record: dict) -> float:
    """Named objects / max(detected, wanted): 1 when every drawn object is a recognisable shape
    and there are at least as many as the prompt asks for. Blind to *which* class, colour,
    count or place: a quality score, not a choice score. Dropping objects to look clean does
    not pay, because the denominator never falls below the wanted count."""
    named = sum(d.cls != "unknown" for d in detections)
    return named / max(len(detections), wanted_objects(record))


class DrawingQualityReward(Reward):
    """`drawing_quality` per image: a signal for post-training a base to draw cleanly without
    teaching it the prompt's choices. On the shapes base it cleaned the RL rollouts but not the
    evaluation sampler's images (docs/results/objectives.md#counting-and-drawing-quality)."""

    kind = "pointwise"
    name = "shapes_quality"

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        quality, strict, partial = [], [], []
        for rec, dets, v in verified(images, prompts, metadata):
            quality.append(drawing_quality(dets, rec))
            strict.append(v.strict)
            partial.append(v.partial)
        quality, strict, partial = map(np.asarray, (quality, strict, partial))
        return RewardOutput(quality, {"strict": strict, "partial": partial})


@register("shapes_quality")
def _quality(**kw):
    return DrawingQualityReward(**kw)


def image_statistics(images) -> dict[str, np.ndarray]:
    """Per-image statistics a biased scorer can be hacked through, and that tell a render from a
    sample: the share of the image covered by shapes (object size), the mean saturation of those
    pixels, and edge sharpness (the 95th percentile of the luminance gradient's magnitude, in
    grey levels per pixel: a render's step edges score high, a blurred blob low)."""
    from ..worlds.shapes.verify import _hue_sat_val

    images = as_uint8_images(images)
    fg_share, sat_mean, sharp = [], [], []
    for img in images:
        _, sat, val = _hue_sat_val(img)
        fg = (sat > 0.35) & (val > 0.25)
        fg_share.append(fg.mean())
        sat_mean.append(float(sat[fg].mean()) if fg.any() else 0.0)
        grey = img.astype(np.float64).mean(-1)
        gy, gx = np.gradient(grey)
        sharp.append(float(np.percentile(np.hypot(gx, gy), 95)))
    return {"size": np.asarray(fg_share), "saturation": np.asarray(sat_mean), "sharpness": np.asarray(sharp)}


class BiasedShapesReward(Reward):
    """The verifier's partial credit plus a small bonus for a nuisance statistic: a stand-in
    for a learned scorer with an exploitable bias (the reward-hacking study, docs/results/three-methods.md).

    score = partial + bias * statistic, statistic = object size (share of the image covered)
    or colour saturation, both in [0, 1]."""

    kind = "pointwise"

    def __init__(self, bias: float = 0.1, statistic: str = "size"):
        if statistic not in ("size", "saturation"):  # both in [0, 1]: the bonus stays below one verifier check
            raise ValueError(f"statistic must be 'size' or 'saturation', got {statistic!r}")
        self.bias, self.statistic = bias, statistic
        self.name = "shapes_biased"
        self._verifier = ShapesVerifierReward("partial")

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        base = self._verifier(images, prompts, metadata)
        stat = image_statistics(images)[self.statistic]
        return RewardOutput(base.scores + self.bias * stat, {**base.components, self.statistic: stat})


@register("shapes_biased")
def _biased(**kw):
    return BiasedShapesReward(**kw)

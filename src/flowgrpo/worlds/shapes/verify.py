"""A programmatic GenEval for the shapes world: detect objects, score them against metadata.

Detection: a pixel is foreground when it is saturated and not dark; its colour is the hue
bin it falls in; objects are 8-connected components of one colour with at least
`MIN_AREA` pixels. The class is the ideal shape (square, circle, upright triangle) drawn in
the component's bounding box that overlaps it best (IoU >= 0.6); a component far from
square proportions or like no shape is "unknown" and matches no class.

Scoring follows GenEval's evaluate(): every include clause needs `count` objects of its
class (with its colour, when given; in the relation, when given, to every object matched by
the clause it points at); every exclude clause fails if `count` or more objects of its
class are present. `strict` is 0/1; `partial` is the share of individual checks passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .grammar import parse_prompt, validate_record

MIN_AREA = 12
POSITION_THRESHOLD = 0.1  # GenEval's
_EIGHT = np.ones((3, 3), dtype=bool)
# Hue bins in degrees: (name, low, high).
_HUE_BINS = (("red", 330, 360), ("red", 0, 22), ("yellow", 22, 80), ("green", 80, 170), ("blue", 170, 280))


@dataclass(frozen=True)
class Detection:
    cls: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int
    match: float  # IoU with the ideal shape of its class
    ious: tuple[tuple[str, float], ...] = ()  # IoU with each class's ideal shape (for shaped rewards)


def _hue_sat_val(img: np.ndarray):
    rgb = img.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return hue, sat, mx


@lru_cache(maxsize=4096)
def _templates(w: int, h: int) -> dict[str, np.ndarray]:
    """Ideal masks of each class filling a w x h box (drawn like the renderer, 50% coverage)."""
    from PIL import Image, ImageDraw

    out = {}
    k = 4
    for cls in ("square", "circle", "triangle"):
        big = Image.new("L", (w * k, h * k), 0)
        d = ImageDraw.Draw(big)
        box = [0, 0, w * k - 1, h * k - 1]
        if cls == "square":
            d.rectangle(box, fill=255)
        elif cls == "circle":
            d.ellipse(box, fill=255)
        else:
            d.polygon([(0, h * k - 1), (w * k - 1, h * k - 1), ((w * k - 1) / 2, 0)], fill=255)
        out[cls] = np.asarray(big.resize((w, h), Image.BOX)) >= 128
    return out


def shape_ious(comp: np.ndarray) -> dict[str, float]:
    """IoU of a component mask with each class's ideal shape drawn in its bounding box."""
    h, w = comp.shape
    return {cls: float((comp & tmpl).sum() / max(1, (comp | tmpl).sum())) for cls, tmpl in _templates(w, h).items()}


def classify_shape(comp: np.ndarray) -> tuple[str, float]:
    """Best-matching class of a component mask by IoU with ideal shapes in its box."""
    h, w = comp.shape
    if not (0.6 <= w / max(h, 1) <= 1.67):
        return "unknown", 0.0
    best, best_iou = max(shape_ious(comp).items(), key=lambda kv: kv[1])
    return (best if best_iou >= 0.6 else "unknown"), best_iou


def detect(img: np.ndarray) -> list[Detection]:
    """Objects in an HxWx3 uint8 image."""
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    hue, sat, val = _hue_sat_val(img)
    fg = (sat > 0.35) & (val > 0.25)
    out: list[Detection] = []
    labels_by_color: dict[str, np.ndarray] = {}
    for name, lo, hi in _HUE_BINS:
        m = fg & (hue >= lo) & (hue < hi)
        labels_by_color[name] = labels_by_color.get(name, np.zeros_like(m)) | m
    for color, mask in labels_by_color.items():
        if not mask.any():
            continue
        labels, n = ndimage.label(mask, structure=_EIGHT)
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            comp = labels[sl] == i
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            cls, match = classify_shape(comp)
            box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            out.append(Detection(cls, color, box, area, match, tuple(shape_ious(comp).items())))
    out.sort(key=lambda d: -d.area)
    return out


def relative_position(box_a, box_b) -> set[str]:
    """GenEval's relation of box_a to box_b (image y grows downwards)."""
    a = np.asarray(box_a, dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b, dtype=np.float64).reshape(2, 2)
    ca, cb = a.mean(0), b.mean(0)
    da, db = np.abs(a[1] - a[0]), np.abs(b[1] - b[0])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (da + db), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


@dataclass
class Verdict:
    strict: float
    partial: float
    checks: list[tuple[str, bool]]


def score(img: np.ndarray, record: dict, detections: list[Detection] | None = None) -> Verdict:
    """Score one image against one GenEval metadata record."""
    validate_record(record)
    dets = detect(img) if detections is None else detections
    by_class: dict[str, list[Detection]] = {}
    for d in dets:
        by_class.setdefault(d.cls, []).append(d)
    checks: list[tuple[str, bool]] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in record["include"]:
        cls, count = clause["class"], clause.get("count", 1)
        found = by_class.get(cls, [])
        ok_count = len(found) >= count
        checks.append((f"{cls}>={count}", ok_count))
        group = found[:count] if ok_count else None
        if "color" in clause:
            colored = [d for d in found if d.color == clause["color"]]
            ok_color = len(colored) >= count
            checks.append((f"{cls} is {clause['color']}", ok_color))
            group = colored[:count] if ok_color else None
        if "position" in clause:
            rel, idx = clause["position"]
            target = matched_groups[idx] if idx < len(matched_groups) else None
            # Any candidate of this class may stand in the relation, not only the largest.
            cands = [d for d in found if d.color == clause["color"]] if "color" in clause else found
            good = [d for d in cands if target and all(rel in relative_position(d.box, t.box) for t in target)]
            ok_pos = len(good) >= count
            checks.append((f"{cls} {rel} #{idx}", ok_pos))
            group = good[:count] if ok_pos else None
        matched_groups.append(group)
    for clause in record.get("exclude", []):
        n = len(by_class.get(clause["class"], []))
        checks.append((f"{clause['class']}<{clause['count']}", n < clause["count"]))
    passed = [ok for _, ok in checks]
    return Verdict(strict=float(all(passed)), partial=float(np.mean(passed)), checks=checks)


def score_batch(images, records) -> tuple[np.ndarray, np.ndarray]:
    """(strict, partial) arrays for a batch of HxWx3 uint8 images and records (or prompts)."""
    strict, partial = [], []
    for img, rec in zip(images, records):
        if isinstance(rec, str):
            rec = parse_prompt(rec)
        v = score(np.asarray(img), rec)
        strict.append(v.strict)
        partial.append(v.partial)
    return np.asarray(strict), np.asarray(partial)

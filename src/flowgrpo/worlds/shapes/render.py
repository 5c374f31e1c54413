"""Render random scenes that satisfy a GenEval metadata record.

Scenes are flat-coloured shapes on a white background, drawn at 4x and box-filtered down so
edges are soft like a generator's. Objects never touch (a gap of two pixels by default, wider
on request), so the verifier's connected components see each one apart. These images are the
pretraining data and the reference images for adversarial rewards.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .grammar import CLASSES, COLORS, validate_record

BACKGROUND = (255, 255, 255)
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
}
SUPERSAMPLE = 4
GAP = 2  # pixels between objects' boxes at the final resolution

# Object side length (pixels at 32x32) by number of objects in the scene.
_SIZE_RANGE = {1: (12, 20), 2: (9, 14), 3: (8, 12), 4: (8, 10), 5: (7, 9)}


def _draw(draw: ImageDraw.ImageDraw, cls: str, box: tuple[int, int, int, int], color, scale: int) -> None:
    x0, y0, x1, y1 = (v * scale for v in box)
    x1, y1 = x1 - 1, y1 - 1
    if cls == "square":
        draw.rectangle([x0, y0, x1, y1], fill=color)
    elif cls == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=color)
    elif cls == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=color)
    else:
        raise ValueError(f"unknown class {cls!r}")


def _overlaps(a, b, gap=GAP) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _relation_holds(rel: str, box, ref) -> bool:
    from .verify import relative_position  # the verifier's own definition, so they agree

    rels = relative_position(box, ref)
    return rel in rels and len(rels) == 1


def _centred_pair(wanted, rng: np.random.Generator, size: int, gap: int) -> list[tuple[int, int, int, int]]:
    """Boxes for a two-object position scene on the canvas's middle row (left of / right of) or middle
    column (above / below): the relation alone fixes where each object goes, up to a pixel or two."""
    rel = wanted[1][2][0]  # the second object carries the position clause
    half, margin = size // 2, max(1, gap // 2)
    lo, hi = _SIZE_RANGE[2]
    scale = size / 32
    boxes = []
    for slot in range(2):
        s = min(int(round(rng.integers(lo, hi + 1) * scale)), half - 2 * margin)
        along = int(rng.integers(slot * half + margin, slot * half + half - margin - s + 1))
        across = (size - s) // 2 + int(rng.integers(-1, 2))
        boxes.append((along, across, along + s, across + s))
    # slot 0 is the left (or upper) half; the related object takes the slot its relation names
    obj_slot = 0 if rel in ("left of", "above") else 1
    ref_box, obj_box = boxes[1 - obj_slot], boxes[obj_slot]
    if rel in ("above", "below"):
        ref_box, obj_box = (ref_box[1], ref_box[0], ref_box[3], ref_box[2]), (obj_box[1], obj_box[0], obj_box[3], obj_box[2])
    return [ref_box, obj_box]


def _coloured(wanted, boxes, rng: np.random.Generator):
    """[(class, colour, box)]: the asked colour, or one drawn at random for an uncoloured clause."""
    return [(cls, color or COLORS[int(rng.integers(len(COLORS)))], box) for (cls, color, _), box in zip(wanted, boxes)]


def sample_layout(record: dict, rng: np.random.Generator, size: int = 32, max_tries: int = 2000, gap: int = GAP,
                  cells: bool = False, centred_relations: bool = False):
    """Objects [(class, colour, box)] satisfying the record; boxes are (x0, y0, x1, y1).

    `gap` is the least distance in pixels between two objects' boxes at the final resolution.
    `cells` puts each object of a multi-object scene in its own quarter of the canvas (a jittered
    2x2 grid), so neighbours never crowd each other. `centred_relations` puts the pair of a position
    scene on the middle row or column instead, each object in the half its relation names.
    """
    validate_record(record)
    wanted = []  # (class, colour or None, position clause or None)
    for clause in record["include"]:
        for _ in range(clause.get("count", 1)):
            wanted.append((clause["class"], clause.get("color"), clause.get("position")))
    n = len(wanted)
    if centred_relations and n == 2 and wanted[0][2] is None and wanted[1][2] is not None:
        boxes = _centred_pair(wanted, rng, size, gap)
        if not _relation_holds(wanted[1][2][0], boxes[1], boxes[0]):
            raise RuntimeError(f"centred layout of {record['prompt']!r} breaks its relation at {size}px")
        return _coloured(wanted, boxes, rng)
    lo, hi = _SIZE_RANGE.get(n, (5, 8))
    scale = size / 32
    for _ in range(max_tries):
        boxes: list[tuple[int, int, int, int]] = []
        used_cells: list[int] = []
        ok = True
        for cls, _, pos in wanted:
            placed = False
            for _ in range(60):
                s = int(round(rng.integers(lo, hi + 1) * scale))
                if cells and n > 1:
                    half, margin = size // 2, max(1, gap // 2)
                    s = min(s, half - 2 * margin)
                    cell = int(rng.choice([c for c in range(4) if c not in used_cells]))
                    cx, cy = (cell % 2) * half, (cell // 2) * half
                    x0 = int(rng.integers(cx + margin, cx + half - margin - s + 1))
                    y0 = int(rng.integers(cy + margin, cy + half - margin - s + 1))
                else:
                    cell = -1
                    x0 = int(rng.integers(1, size - s))
                    y0 = int(rng.integers(1, size - s))
                box = (x0, y0, x0 + s, y0 + s)
                if any(_overlaps(box, b, gap) for b in boxes):
                    continue
                if pos is not None:
                    # position clauses point at the first object of include[index]
                    ref_idx = sum(c.get("count", 1) for c in record["include"][: pos[1]])
                    if not _relation_holds(pos[0], box, boxes[ref_idx]):
                        continue
                boxes.append(box)
                used_cells.append(cell)
                placed = True
                break
            if not placed:
                ok = False
                break
        if ok:
            return _coloured(wanted, boxes, rng)
    raise RuntimeError(f"could not lay out {record['prompt']!r} at {size}px")


def render_layout(objects, size: int = 32) -> np.ndarray:
    big = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for cls, color, box in objects:
        _draw(draw, cls, box, PALETTE[color], SUPERSAMPLE)
    return np.asarray(big.resize((size, size), Image.BOX))


def render(record: dict, rng: np.random.Generator | int | None = None, size: int = 32, gap: int = GAP,
           cells: bool = False, centred_relations: bool = False) -> np.ndarray:
    """One HxWx3 uint8 image satisfying `record`."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    return render_layout(sample_layout(record, rng, size, gap=gap, cells=cells, centred_relations=centred_relations), size)


def render_batch(records: list[dict], seed: int, size: int = 32, gap: int = GAP, cells: bool = False,
                 centred_relations: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render(r, rng, size, gap, cells, centred_relations) for r in records])


__all__ = ["PALETTE", "BACKGROUND", "CLASSES", "render", "render_batch", "sample_layout", "render_layout"]

"""Held-out evaluation split over every process, with the table one process would make.

The work is cut into units of whole prompts (as many as fit `batch_size` images, or one prompt
in several batches when it has more images than that); unit u goes to process u mod N. Each
image's initial noise comes from its own seed (prompt index, image index), and every unit is
drawn as the same batches whatever N is, so the images, and with them the table, are the same
on 1 or N processes. A process with fewer units draws a spare one and drops it: under FSDP2 a
forward pass is a collective, and every process must make the same number of them.

Each process judges its own units (whole prompts, so pairwise judges see whole groups) and only
verdicts and scores travel. Shapes prompts are judged by the verifier (the accuracy table of
eval/shapes.py); any other prompts by rewards (pointwise, pairwise, remote, judges), whose
weighted sum per image plays the role of the verifier's strict score: a mean per tag (GenEval's
`tag` when the prompts carry one) and the overall as their mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

GRID_PROMPTS = 12  # prompts shown in an evaluation's grid, spread over the prompt list


@dataclass
class HeldOutResult:
    table: dict
    grid_images: list[np.ndarray] = field(default_factory=list)  # images of the grid's prompts, in order
    grid_prompts: list[str] = field(default_factory=list)
    images: np.ndarray | None = None  # every image, in prompt order (keep_images, one process only)


def evaluation_units(n_prompts: int, per_prompt: int | list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices of each unit of work: consecutive prompts while their images fit
    `batch_size` (a prompt with more images than that is a unit of its own)."""
    counts = [per_prompt] * n_prompts if isinstance(per_prompt, int) else list(per_prompt)
    units, current, size = [], [], 0
    for i, c in enumerate(counts):
        if current and size + c > batch_size:
            units.append(current)
            current, size = [], 0
        current.append(i)
        size += c
    return units + ([current] if current else [])


def images_per_tag(items: list[dict], per_tag: int) -> list[int]:
    """Each prompt's image count when every tag gets about `per_tag` images, spread evenly over
    its prompts (ceil(per_tag / prompts of the tag) each): GenEval's overall averages the tags, so
    a tag with 2 prompts needs as many images as one with 34 for the same precision."""
    tags = [str(it["metadata"].get("tag", "all")) for it in items]
    return [max(1, math.ceil(per_tag / tags.count(t))) for t in tags]


def grid_prompt_indices(n_prompts: int) -> list[int]:
    return list(range(0, n_prompts, max(1, n_prompts // GRID_PROMPTS)))[:GRID_PROMPTS]


def is_shapes(items: list[dict]) -> bool:
    """The shapes verifier can judge these prompts: GenEval metadata with a tag whose objects are
    all shapes (real GenEval prompts name COCO classes and need a detector reward)."""
    from ..worlds.shapes.grammar import CLASSES

    return bool(items) and all("include" in it["metadata"] and "tag" in it["metadata"]
                               and all(obj.get("class") in CLASSES for obj in it["metadata"]["include"])
                               for it in items)


def evaluate_held_out(policy, items: list[dict], *, images_per_prompt: int | list[int], steps: int, guidance: float,
                      resolution: int, seed: int, batch_size: int, rewards: dict | None = None,
                      accelerator=None, keep_images: bool = False, progress: bool = False,
                      solver: str = "ode") -> HeldOutResult:
    """Draw `images_per_prompt` ODE images (`solver`: ode or dpm2) of every item ({"prompt", "metadata"};
    one count for all or a list, each item's own) and judge them.
    `rewards`: {name: (reward, weight)} for prompts the verifier cannot judge. With `accelerator`
    the work is split over its processes; every process gets the whole table."""
    from .shapes import image_seeds, sample_images

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shapes = is_shapes(items)
    if not shapes and not rewards:
        raise ValueError("held-out prompts without shapes metadata need rewards to judge them "
                         "(run.eval_rewards or reward.weights)")
    counts = [images_per_prompt] * len(items) if isinstance(images_per_prompt, int) else list(images_per_prompt)
    if len(counts) != len(items) or min(counts, default=1) < 1:
        raise ValueError(f"images_per_prompt: one count >= 1 or one per prompt ({len(items)}), got {images_per_prompt}")
    first_image = np.concatenate([[0], np.cumsum(counts)])
    seeds = image_seeds(len(items), counts, seed)
    units = evaluation_units(len(items), counts, batch_size)
    mine = units[rank::world]
    rounds = math.ceil(len(units) / world)
    grid = set(grid_prompt_indices(len(items)))
    judged, grid_images, all_images = [], {}, {}
    for r in range(rounds):
        spare = r >= len(mine)
        unit = units[0] if spare else mine[r]
        prompts = [items[i]["prompt"] for i in unit for _ in range(counts[i])]
        unit_seeds = [seeds[first_image[i] + j] for i in unit for j in range(counts[i])]
        images = sample_images(policy, prompts, unit_seeds, steps=steps, guidance=guidance,
                               resolution=resolution, batch_size=batch_size, progress=progress and world == 1,
                               kind=solver)
        if spare:
            continue
        judged.append((unit[0], _judge(images, [items[i] for i in unit], [counts[i] for i in unit], shapes,
                                       rewards, first=unit[0])))
        offset = 0
        for i in unit:
            if i in grid:
                grid_images[i] = images[offset:offset + counts[i]]
            if keep_images:
                all_images[i] = images[offset:offset + counts[i]]
            offset += counts[i]
    if world > 1:
        from accelerate.utils import gather_object

        judged = sum(gather_object([judged]), [])
        grid_images = {k: v for part in gather_object([grid_images]) for k, v in part.items()}
    rows = [row for _, unit_rows in sorted(judged, key=lambda x: x[0]) for row in unit_rows]
    table = _shapes_table(rows, items, counts, resolution) if shapes else _reward_table(rows, rewards)
    order = sorted(grid_images)
    return HeldOutResult(table, [grid_images[i] for i in order], [items[i]["prompt"] for i in order],
                         np.concatenate([all_images[i] for i in sorted(all_images)]) if keep_images and all_images
                         else None)


def _judge(images: np.ndarray, unit_items: list[dict], counts: list[int], shapes: bool, rewards: dict | None,
           first: int) -> list[dict]:
    """One row per image: the verifier's verdict and image statistics, or every reward's score."""
    records = [it["metadata"] for it, c in zip(unit_items, counts) for _ in range(c)]
    if shapes:
        from ..rewards.shapes import image_statistics
        from .shapes import image_verdicts

        stats = image_statistics(images)
        return [{**v, **{f"stat/{k}": float(a[n]) for k, a in stats.items()}}
                for n, v in enumerate(image_verdicts(images, records))]
    prompts = [it["prompt"] for it, c in zip(unit_items, counts) for _ in range(c)]
    group_ids = np.repeat(np.arange(first, first + len(unit_items)), counts)  # one group per prompt
    scores = {name: np.asarray(reward(images, prompts, records, group_ids).scores, dtype=np.float64)
              for name, (reward, _) in rewards.items()}
    return [{"scores": {name: float(s[n]) for name, s in scores.items()},
             "total": float(sum(w * scores[name][n] for name, (_, w) in rewards.items())),
             "tag": str(rec.get("tag", "all"))} for n, rec in enumerate(records)]


def _shapes_table(rows: list[dict], items: list[dict], counts: list[int], resolution: int) -> dict:
    from ..rewards.shapes import image_statistics
    from ..worlds.shapes.render import render_batch
    from .shapes import table_from_verdicts

    table = table_from_verdicts(rows)
    stat_keys = [k for k in rows[0] if k.startswith("stat/")] if rows else []
    stats = {k[len("stat/"):]: float(np.mean([r[k] for r in rows])) for k in stat_keys}
    # the renderer's own scenes for the same records: how far samples drift from what the world draws
    records = [it["metadata"] for it, c in zip(items, counts) for _ in range(c)]
    ref = image_statistics(render_batch(records, seed=99, size=resolution))
    table["image_stats"] = {**stats, **{f"{k}_ref": float(v.mean()) for k, v in ref.items()}}
    return table


def _reward_table(rows: list[dict], rewards: dict) -> dict:
    totals = [r["total"] for r in rows]
    tags = [r["tag"] for r in rows]
    per_tag = {t: float(np.mean([s for s, tt in zip(totals, tags) if tt == t])) for t in sorted(set(tags))}
    per_reward = {name: float(np.mean([r["scores"][name] for r in rows])) for name in rewards}
    return {"overall": float(np.mean(list(per_tag.values()))), "per_tag": per_tag, "per_reward": per_reward,
            "n_images": len(rows), "strict": totals, "tags": tags}

"""Per-tag verifier accuracy of a policy on shapes prompts (GenEval's table, in miniature).

Every image has its own seed (derived from the prompt's index and the image's index), so
the same prompts give the same initial noise before and after training, whatever the batch
size: "before" and "after" are paired, image by image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..rewards.base import as_uint8_images
from ..sampling import rollout
from ..worlds.shapes.grammar import HELD_OUT_BINDINGS, bindings
from ..worlds.shapes.verify import detect, score


def image_seeds(n_prompts: int, per_prompt: int | list[int], seed: int) -> list[int]:
    """The seed of image j of prompt i (`per_prompt`: one count for all, or each prompt's own):
    it depends on (seed, i, j) alone, so a prompt's first images are the same at any count."""
    counts = [per_prompt] * n_prompts if isinstance(per_prompt, int) else list(per_prompt)
    return [seed * 1_000_003 + i * 1_009 + j for i in range(n_prompts) for j in range(counts[i])]


@torch.no_grad()
def sample_images(policy, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                  resolution: int, batch_size: int = 64, kind: str = "ode", noise_level: float = 0.0,
                  progress: bool = False) -> np.ndarray:
    """uint8 images, one per (prompt, seed), with the Euler ODE by default (`kind` dpm2: DPM-Solver++(2M))."""
    shape = policy.latent_shape(resolution, resolution)
    negative = policy.encode_prompts([""]) if guidance != 1.0 else None
    cache: dict[str, dict] = {}
    out = []
    rng = range(0, len(prompts), batch_size)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc="sampling", unit="batch")
    for start in rng:
        chunk = prompts[start:start + batch_size]
        for p in set(chunk) - set(cache):
            cache[p] = {k: v[0] for k, v in policy.encode_prompts([p]).items()}
        cond = {k: torch.stack([cache[p][k] for p in chunk]) for k in cache[chunk[0]]}
        init = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                            for s in seeds[start:start + batch_size]])
        traj = rollout(policy, cond, negative, num_steps=steps, guidance=guidance, noise_level=noise_level,
                       kind=kind, height=resolution, width=resolution,
                       generator=torch.Generator().manual_seed(seeds[start]), init_latents=init)
        out.append(as_uint8_images(traj.images))
    return np.concatenate(out)


UNSEEN = "unseen_bindings"  # the row of prompts binding a colour to a class never bound in training


def image_verdicts(images: np.ndarray, records: list[dict]) -> list[dict]:
    """The verifier's verdict on each image (strict, partial, its table row, objects detected and
    named): what accuracy_table averages, computed image by image so that processes can each
    judge their share and one table is made of all of them."""
    held = set(HELD_OUT_BINDINGS)
    out = []
    for img, rec in zip(images, records):
        dets = detect(img)
        v = score(img, rec, dets)
        out.append({"strict": v.strict, "partial": v.partial,
                    "tag": UNSEEN if bindings(rec) & held else rec["tag"],
                    "objects": len(dets), "named": sum(d.cls != "unknown" for d in dets)})
    return out


def table_from_verdicts(verdicts: list[dict]) -> dict:
    """{"overall", "per_tag", "partial", "n_images", "recognised_objects", "strict", "tags"}.

    overall is the mean of the tags (GenEval). Prompts that bind a colour to a class no
    training prompt binds it to (the grammar's held-out bindings) are a composition test, not
    a sample of the tag: they form their own row, `unseen_bindings`, outside the overall.
    `recognised_objects` is the share of detected objects the verifier names as some shape.
    """
    strict = [v["strict"] for v in verdicts]
    tags = [v["tag"] for v in verdicts]
    n_objects = sum(v["objects"] for v in verdicts)
    n_known = sum(v["named"] for v in verdicts)
    per_tag = {t: float(np.mean([s for s, tt in zip(strict, tags) if tt == t])) for t in sorted(set(tags))}
    seen = [v for t, v in per_tag.items() if t != UNSEEN]
    return {"overall": float(np.mean(seen)) if seen else float("nan"), "per_tag": per_tag,
            "partial": float(np.mean([v["partial"] for v in verdicts])), "n_images": len(verdicts),
            "recognised_objects": n_known / n_objects if n_objects else float("nan"),
            "strict": strict, "tags": tags}


def accuracy_table(images: np.ndarray, records: list[dict]) -> dict:
    """The verifier's table of `images` drawn for `records` (table_from_verdicts)."""
    return table_from_verdicts(image_verdicts(images, records))


def paired_difference_ci(before: list[float], after: list[float], tags: list[str]) -> tuple[float, float, float]:
    """Difference of the tag-averaged accuracy (after - before) with a 95% CI (the overall's
    tags: the unseen-bindings row is left out, as from the overall).

    Images are paired by seed, so the per-image difference d_i in {-1, 0, 1} is averaged
    per tag, and the tag means are averaged; the variance is the sum over tags of
    var(d within tag) / n_tag, divided by n_tags^2 (normal approximation).
    """
    b, a = np.asarray(before), np.asarray(after)
    groups = sorted(set(tags) - {UNSEEN})
    t = np.asarray(tags)
    means, var = [], 0.0
    for g in groups:
        d = a[t == g] - b[t == g]
        means.append(d.mean())
        var += d.var(ddof=1) / len(d) if len(d) > 1 else 0.0
    diff = float(np.mean(means))
    half = 1.96 * math.sqrt(var) / len(groups)
    return diff, diff - half, diff + half


def format_table(results: dict[str, dict]) -> str:
    """Text table: one column per named result (e.g. before/after), one row per tag."""
    names = list(results)
    tags = sorted({t for r in results.values() for t in r["per_tag"]} - {UNSEEN})
    lines = [f"{'tag':<15}" + "".join(f"{n:>10}" for n in names)]
    for t in tags:
        lines.append(f"{t:<15}" + "".join(f"{results[n]['per_tag'].get(t, float('nan')):>10.3f}" for n in names))
    lines.append(f"{'overall':<15}" + "".join(f"{results[n]['overall']:>10.3f}" for n in names))
    if any(UNSEEN in r["per_tag"] for r in results.values()):
        lines.append(f"{UNSEEN:<15}" + "".join(f"{results[n]['per_tag'].get(UNSEEN, float('nan')):>10.3f}"
                                               for n in names) + "  (outside the overall)")
    if all("recognised_objects" in r for r in results.values()):
        lines.append(f"{'shapes named':<15}" + "".join(f"{results[n]['recognised_objects']:>10.3f}" for n in names))
    lines.append(f"{'images':<15}" + "".join(f"{results[n]['n_images']:>10d}" for n in names))
    return "\n".join(lines)


def evaluate_policy(policy, records: list[dict], *, images_per_prompt: int, steps: int, guidance: float,
                    resolution: int, seed: int = 0, batch_size: int = 64, progress: bool = False,
                    solver: str = "ode"):
    """(table, images, expanded records) for the shapes verifier, on this process alone (the
    trainer's held-out evaluation, eval/held_out.py, splits the same work over processes and
    gives the same table). `solver`: ode (Euler) or dpm2 (DPM-Solver++(2M))."""
    from .held_out import evaluate_held_out

    result = evaluate_held_out(policy, [{"prompt": r["prompt"], "metadata": r} for r in records],
                               images_per_prompt=images_per_prompt, steps=steps, guidance=guidance,
                               resolution=resolution, seed=seed, batch_size=batch_size, keep_images=True,
                               progress=progress, solver=solver)
    expanded = [r for r in records for _ in range(images_per_prompt)]
    return result.table, result.images, expanded


def image_stats_vs_renders(images: np.ndarray, records: list[dict], seed: int = 99) -> dict[str, float]:
    """Mean object size, saturation and edge sharpness of `images`, and the same of the
    renderer's scenes for the same records (`*_ref`): how far samples drift from what the
    world draws (a biased scorer's hacking, an adversarial reward's pull)."""
    from ..rewards.shapes import image_statistics
    from ..worlds.shapes.render import render_batch

    gen = image_statistics(images)
    ref = image_statistics(render_batch(records, seed=seed, size=images.shape[1]))
    return {**{k: float(v.mean()) for k, v in gen.items()}, **{f"{k}_ref": float(v.mean()) for k, v in ref.items()}}


def write_json(table: dict, path: str | Path) -> None:
    slim = {k: v for k, v in table.items() if k not in ("strict", "tags")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(slim, indent=2))

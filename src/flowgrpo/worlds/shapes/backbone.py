"""A frozen feature backbone for the shapes world's adversarial reward, trained here.

Adv-GRPO's discriminator is a small head on frozen DINOv2 features: DINOv2 already "sees"
blur, noise, washed-out colour and wobbly outlines. No such backbone exists for 32x32 flat
shapes, and the seeded random one (`rewards.adversarial.shapes_backbone`) leaves the head near
chance on this world's samples (docs/results/three-methods.md). This one is the same tiny `Dinov2Model`,
trained on renders alone, without any generated image: tell a clean render from the same
render blurred, noised, desaturated, washed out, shrunk, with bled colour, or warped
(8 classes, cross-entropy on the CLS token). Those are the ways a generator's samples differ
from the world's scenes, so the features carry them; the discriminator head still has to
learn which of them the generator actually shows.

    python scripts/train_shapes_backbone.py --out assets/shapes-dinov2
    reward.args.adversarial.backbone=assets/shapes-dinov2      # a local DINOv2 folder
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

from .grammar import split_records
from .render import render

CORRUPTIONS = ("clean", "blur", "noise", "desaturate", "wash", "shrink", "bleed", "warp")


def corrupt(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One corruption of a uint8 HxWx3 render, at a random strength."""
    x = img.astype(np.float64)
    if kind == "clean":
        return img
    if kind == "blur":
        x = gaussian_filter(x, sigma=(rng.uniform(0.5, 1.3),) * 2 + (0,))
    elif kind == "noise":
        x = x + rng.normal(0, rng.uniform(6, 20), x.shape)
    elif kind == "desaturate":
        grey = x.mean(-1, keepdims=True)
        x = grey + rng.uniform(0.4, 0.8) * (x - grey)
    elif kind == "wash":
        x = x + rng.uniform(0.15, 0.4) * (255 - x)
    elif kind == "shrink":
        f = rng.uniform(0.65, 0.85)
        small = zoom(x, (f, f, 1), order=1)
        x = np.full_like(x, 255.0)
        top, left = (np.array(x.shape[:2]) - small.shape[:2]) // 2
        x[top:top + small.shape[0], left:left + small.shape[1]] = small
    elif kind == "bleed":
        grey = x.mean(-1, keepdims=True)
        x = grey + gaussian_filter(x - grey, sigma=(rng.uniform(1.0, 2.0),) * 2 + (0,))
    elif kind == "warp":
        h, w = x.shape[:2]
        amp, smooth = rng.uniform(0.8, 1.8), 3.0
        dy = gaussian_filter(rng.normal(0, 1, (h, w)), smooth)
        dx = gaussian_filter(rng.normal(0, 1, (h, w)), smooth)
        dy, dx = (d * amp / (np.abs(d).max() + 1e-8) for d in (dy, dx))
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        x = np.stack([map_coordinates(x[..., c], [yy + dy, xx + dx], order=1, mode="nearest") for c in range(3)], -1)
    else:
        raise ValueError(f"unknown corruption {kind!r}; one of {CORRUPTIONS}")
    return np.clip(x, 0, 255).round().astype(np.uint8)


def make_batch(records: list[dict], n: int, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """n images with balanced corruption labels, each a fresh render of a random record."""
    labels = rng.permutation(np.arange(n) % len(CORRUPTIONS))
    recs = [records[i] for i in rng.integers(len(records), size=n)]
    imgs = np.stack([corrupt(render(r, rng, size), CORRUPTIONS[k], rng) for r, k in zip(recs, labels)])
    return imgs, labels


def train_backbone(out: str | Path, steps: int = 1500, batch: int = 128, lr: float = 3e-4, seed: int = 0,
                   size: int = 32, log_every: int = 100):
    """Train the tiny DINOv2 from the random shapes backbone's initialisation and save it as a
    `Dinov2Model` folder (config.json + model.safetensors + training.json). Returns the
    trained `FeatureBackbone` and the training record."""
    from ...rewards.adversarial import shapes_backbone

    bb = shapes_backbone(seed, size)
    model = bb.model.train().requires_grad_(True)
    head = torch.nn.Linear(bb.dim, len(CORRUPTIONS))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    recs = split_records()["train"]
    t0, log = time.time(), []
    for step in range(steps):
        imgs, labels = make_batch(recs, batch, rng, size)
        cls = model(pixel_values=bb.pixels(imgs)).last_hidden_state[:, 0]
        loss = F.cross_entropy(head(cls), torch.as_tensor(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            log.append({"step": step + 1, "loss": loss.item(), "seconds": time.time() - t0})
            print(f"step {step + 1}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval().requires_grad_(False)
    # held-out check on the test split's prompts: per-corruption accuracy of the training head
    test_rng = np.random.default_rng(seed + 1)
    imgs, labels = make_batch(split_records()["test"], 64 * len(CORRUPTIONS), test_rng, size)
    with torch.no_grad():
        pred = head(model(pixel_values=bb.pixels(imgs)).last_hidden_state[:, 0]).argmax(-1).numpy()
    per_class = {c: float((pred[labels == k] == k).mean()) for k, c in enumerate(CORRUPTIONS)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    info = {"objective": "8-way corruption classification of renders (flowgrpo.worlds.shapes.backbone)",
            "init": f"shapes_backbone(seed={seed})", "steps": steps, "batch": batch, "lr": lr,
            "held_out_accuracy": per_class, "log": log}
    (out / "training.json").write_text(json.dumps(info, indent=1))
    return bb, info

"""Train the shapes world's frozen backbone for the adversarial reward, and probe it.

    python scripts/train_shapes_backbone.py --out assets/shapes-dinov2 --steps 600
    python scripts/train_shapes_backbone.py --probe assets/shapes-dinov2 --n 512

--probe measures what the discriminator needs: can a fresh logistic head on the frozen CLS
features tell the base model's samples from renders of the same prompts? Held-out accuracy
for the seeded random backbone and for the trained one (flowgrpo.worlds.shapes.backbone).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def probe(backbones: dict, model: str, n: int, seed: int = 0, tags=("colors", "counting")) -> dict:
    from flowgrpo.eval.shapes import image_seeds, sample_images
    from flowgrpo.models import load_policy
    from flowgrpo.rewards.adversarial import load_backbone
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.render import render_batch

    recs = [r for r in split_records()["train"] if r["tag"] in tags]
    rng = np.random.default_rng(seed)
    chosen = [recs[i] for i in rng.integers(len(recs), size=n)]
    policy = load_policy(model)
    gen = sample_images(policy, [r["prompt"] for r in chosen], image_seeds(1, n, seed), steps=8, guidance=1.0,
                        resolution=32)
    ref = render_batch(chosen, seed=seed + 1)
    cut = 3 * n // 4
    out = {}
    for name, spec in backbones.items():
        bb = load_backbone(spec)
        feats = [bb(x)[0] for x in (gen, ref)]
        x = torch.cat(feats)
        y = torch.cat([torch.zeros(n), torch.ones(n)])
        train = torch.cat([torch.arange(cut), n + torch.arange(cut)])
        test = torch.cat([torch.arange(cut, n), n + torch.arange(cut, n)])
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
        x = (x - mu) / sd
        head = torch.nn.Linear(x.shape[1], 1)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(500):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x[train]).squeeze(1), y[train])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = float(((head(x[test]).squeeze(1) > 0).float() == y[test]).float().mean())
        out[name] = acc
        print(f"{name}: held-out accuracy, samples vs renders: {acc:.3f} ({2 * (n - cut)} images)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="train and save the backbone here")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--probe", help="a trained backbone folder to compare with the random one")
    ap.add_argument("--model", default="assets/shapes-sd3-alt")
    ap.add_argument("--n", type=int, default=512)
    args = ap.parse_args()
    if args.out:
        from flowgrpo.worlds.shapes.backbone import train_backbone

        _, info = train_backbone(args.out, steps=args.steps, batch=args.batch)
        print(json.dumps(info["held_out_accuracy"]))
    if args.probe:
        print(json.dumps(probe({"random (backbone: shapes)": "shapes", f"trained ({args.probe})": args.probe},
                               args.model, args.n)))


if __name__ == "__main__":
    main()

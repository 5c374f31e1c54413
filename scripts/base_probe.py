"""How cleanly a shapes base draws, CFG-free: per-tag strict accuracy, images with nothing drawn, objects named.

    python scripts/base_probe.py --model assets/shapes-sd3-alt --tags single_object colors counting two_object position

Over n ODE samples a prompt of the chosen split: strict verifier accuracy per tag (unseen
bindings counted in their tag, as `flowgrpo headroom` does), the share of images in which the
verifier finds no object at all ("blank"), and the share of detected objects it names as some
shape. `--shift` samples with another scheduler shift (the shipped models use 1).
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch


def main() -> None:
    from flowgrpo.eval.shapes import image_seeds, sample_images
    from flowgrpo.models import load_policy
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.verify import detect, score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/shapes-sd3-alt")
    ap.add_argument("--split", default="test", choices=["train", "test"])
    ap.add_argument("--tags", nargs="*", default=["single_object", "colors", "counting", "two_object", "position"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--shift", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model, shift=args.shift)
    records = [r for r in split_records()[args.split] if r["tag"] in args.tags]
    images = sample_images(policy, [r["prompt"] for r in records for _ in range(args.n)],
                           image_seeds(len(records), args.n, args.seed), steps=args.steps, guidance=1.0, resolution=32)
    per_tag: dict[str, list[float]] = collections.defaultdict(list)
    blank = named = detected = 0
    for i, rec in enumerate(records):
        for img in images[i * args.n:(i + 1) * args.n]:
            dets = detect(img)
            blank += not dets
            detected += len(dets)
            named += sum(d.cls != "unknown" for d in dets)
            per_tag[rec["tag"]].append(score(img, rec, dets).strict)
    cells = " ".join(f"{t} {np.mean(v):.3f}" for t, v in per_tag.items())
    print(f"{args.model} ({len(images)} images, {args.steps}-step ODE, CFG-free): {cells} | "
          f"blank {blank / len(images):.3f} | objects named {named / max(1, detected):.3f}")


if __name__ == "__main__":
    main()

"""Why detected objects go unnamed: per-tag share of objects named as a shape, and the reason for each unnamed one.

    python scripts/named_objects.py --model assets/shapes-sd3-alt --split train
    python scripts/named_objects.py --model assets/shapes-sd3 --guidance 4.5

Over n ODE samples a prompt of the split (position left out, as in the headroom tables), each
detection the verifier leaves "unknown" is put in one of three bins: its box is far from square
(width/height outside 0.6 .. 1.67: two objects merged into one component, or a bar), or its
best IoU with an ideal shape is 0.5 .. 0.6 (a near miss) or below 0.5 (no shape).
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
import torch


def unnamed_reason(det) -> str:
    w, h = det.box[2] - det.box[0], det.box[3] - det.box[1]
    if not 0.6 <= w / max(h, 1) <= 1.67:
        return "aspect"
    best = max(iou for _, iou in det.ious)
    return "near miss (IoU 0.5-0.6)" if best >= 0.5 else "no shape (IoU < 0.5)"


def main() -> None:
    from flowgrpo.eval.shapes import image_seeds, sample_images
    from flowgrpo.models import load_policy
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.verify import detect

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/shapes-sd3-alt")
    ap.add_argument("--split", default="train", choices=["train", "test"])
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model)
    records = [r for r in split_records()[args.split] if r["tag"] != "position"]
    images = sample_images(policy, [r["prompt"] for r in records for _ in range(args.n)],
                           image_seeds(len(records), args.n, args.seed), steps=args.steps,
                           guidance=args.guidance, resolution=32)
    named: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    reasons: collections.Counter = collections.Counter()
    for i, rec in enumerate(records):
        for img in images[i * args.n:(i + 1) * args.n]:
            for det in detect(img):
                cell = named[rec["tag"]]
                cell[0] += det.cls != "unknown"
                cell[1] += 1
                if det.cls == "unknown":
                    reasons[unnamed_reason(det)] += 1
    total = sum(c[1] for c in named.values())
    share = sum(c[0] for c in named.values()) / max(1, total)
    tags = " ".join(f"{t} {c[0] / c[1]:.3f}" for t, c in sorted(named.items()))
    why = ", ".join(f"{k} {v}" for k, v in reasons.most_common())
    print(f"{args.model} (guidance {args.guidance}, {args.split}, {len(images)} images, {total} objects): "
          f"named {share:.3f} | {tags} | unnamed: {why}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

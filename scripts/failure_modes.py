"""Why a shapes model fails a prompt: wrong colour, wrong class, no shape, or nothing drawn.

    python scripts/failure_modes.py --model assets/shapes-sd3-alt --split train --tags colors --n 16

For each prompt, over n CFG-free ODE samples: strict passes ("ok"), a detected object of the
asked class in another colour ("wrong_colour"), only other classes ("wrong_class"), only
unrecognised blobs ("unknown"), no object at all ("none"); and the colours detected.
"""

from __future__ import annotations

import argparse
import collections

import torch


def failure(dets, record, strict: float) -> str:
    if strict:
        return "ok"
    if not dets:
        return "none"
    wanted = {c["class"] for c in record["include"]}
    if any(d.cls in wanted for d in dets):
        return "wrong_colour" if any("color" in c for c in record["include"]) else "wrong_count_or_place"
    return "unknown" if all(d.cls == "unknown" for d in dets) else "wrong_class"


def main() -> None:
    from flowgrpo.eval.shapes import image_seeds, sample_images
    from flowgrpo.models import load_policy
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.verify import detect, score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/shapes-sd3-alt")
    ap.add_argument("--lora", default=None, help="a LoRA folder, loaded at its trained strength")
    ap.add_argument("--split", default="train", choices=["train", "test"])
    ap.add_argument("--tags", nargs="*", default=["colors"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model)
    if args.lora:
        policy.load_lora(args.lora, 1.0)
    records = [r for r in split_records()[args.split] if r["tag"] in args.tags]
    expanded = [r for r in records for _ in range(args.n)]
    images = sample_images(policy, [r["prompt"] for r in expanded], image_seeds(len(records), args.n, args.seed),
                           steps=args.steps, guidance=1.0, resolution=32)
    totals: collections.Counter = collections.Counter()
    for i, rec in enumerate(records):
        kinds, colours = collections.Counter(), collections.Counter()
        for img in images[i * args.n:(i + 1) * args.n]:
            dets = detect(img)
            kinds[failure(dets, rec, score(img, rec, dets).strict)] += 1
            colours.update(d.color for d in dets)
        totals.update(kinds)
        print(f"{rec['prompt']:<40} {dict(kinds)}  colours seen {dict(colours)}")
    fails = sum(v for k, v in totals.items() if k != "ok")
    print(f"all: {dict(totals)}; failures {fails}, of which wrong colour {totals['wrong_colour']}")


if __name__ == "__main__":
    main()

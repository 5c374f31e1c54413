"""Does a shapes model read relation words? Layout statistics of its position samples, and its text encodings.

    python scripts/relation_probe.py --model assets/shapes-sd3-cells --guidance 4.5
    python scripts/relation_probe.py --model assets/shapes-sd3-cells-alt --lora runs/shapes_six/lora

For every position prompt of the split, n ODE samples. Among the images in which the verifier finds
both named objects (the first of each class), it counts how often the asked relation holds, how often
the asked axis holds (left/right: side by side; above/below: one over the other), how often the opposite
relation holds, and how often the pair sits on a diagonal (both axes). The renderer's training scenes
put the pair on the asked axis every time, never on a diagonal; a model that ignores the relation word
places the pair as it does for two_object prompts.

The text part compares the encodings a pipeline feeds its transformer (both CLIP encoders' hidden
states, as flowgrpo's policy builds them) for two prompts that differ only in the relation word, left
of against right of and above against below: the least per-token cosine similarity. Near 1, the words
reach the transformer as almost the same thing.
"""

from __future__ import annotations

import argparse
import numpy as np
import torch

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
AXIS = {"left of": "x", "right of": "x", "above": "y", "below": "y"}


def layout_stats(images, records) -> dict[str, float]:
    from flowgrpo.worlds.shapes.verify import detect, relative_position, score

    n = len(images) // len(records)
    counts = dict(images=0, passed=0, both=0, relation=0, axis=0, opposite=0, diagonal=0)
    for i, rec in enumerate(records):
        ref, obj = rec["include"]
        asked = obj["position"][0]
        for img in images[i * n:(i + 1) * n]:
            found = detect(img)
            counts["images"] += 1
            counts["passed"] += score(img, rec, found).strict
            first = [next((d for d in found if d.cls == c["class"]), None) for c in (obj, ref)]
            if None in first:
                continue
            rels = relative_position(first[0].box, first[1].box)
            counts["both"] += 1
            counts["relation"] += asked in rels
            counts["axis"] += any(AXIS[r] == AXIS[asked] for r in rels)
            counts["opposite"] += OPPOSITE[asked] in rels
            counts["diagonal"] += len({AXIS[r] for r in rels}) == 2
    both = max(1, counts["both"])
    return {"images": counts["images"], "strict": counts["passed"] / counts["images"],
            "both named": counts["both"] / counts["images"],
            **{f"{k} | both": counts[k] / both for k in ("relation", "axis", "opposite", "diagonal")}}


def opposite_word_similarity(policy) -> dict[str, float]:
    """Per pair of opposite relations: the least per-token cosine of two prompts that differ only there."""
    out = {}
    for a, b in (("left of", "right of"), ("above", "below")):
        emb = policy.encode_prompts([f"a photo of a square {r} a circle" for r in (a, b)])["prompt_embeds"].float()
        real = emb[0].norm(dim=-1) > 0  # the zero T5 slot compares as 0 and says nothing
        out[f"{a} / {b}"] = float(torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=-1)[real].min())
    return out


def main() -> None:
    from flowgrpo.eval.shapes import image_seeds, sample_images
    from flowgrpo.models import load_policy
    from flowgrpo.worlds.shapes.grammar import split_records

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/shapes-sd3-cells-alt")
    ap.add_argument("--lora", default=None, help="a LoRA folder to load on the model")
    ap.add_argument("--guidance", type=float, default=1.0, help="4.5 for the pretrained teachers")
    ap.add_argument("--split", default="train", choices=["train", "test"])
    ap.add_argument("--n", type=int, default=8, help="images a prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model)
    if args.lora:
        policy.load_lora(args.lora)
    records = [r for r in split_records()[args.split] if r["tag"] == "position"]
    images = sample_images(policy, [r["prompt"] for r in records for _ in range(args.n)],
                           image_seeds(len(records), args.n, args.seed), steps=args.steps,
                           guidance=args.guidance, resolution=32)
    stats = layout_stats(images, records)
    cells = " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
    print(f"{args.model}{' + ' + args.lora if args.lora else ''} ({args.split} position prompts, "
          f"CFG {args.guidance}): {cells}")
    sims = opposite_word_similarity(policy)
    print("text, least per-token cosine of prompts differing in the relation: "
          + ", ".join(f"{k} {v:.3f}" for k, v in sims.items()))


if __name__ == "__main__":
    main()

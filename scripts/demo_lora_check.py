"""Check a trained LoRA the way a diffusers user would: plain pipeline, plain `load_lora_weights`.

Samples the held-out prompts with `StableDiffusion3Pipeline.__call__` itself (not flowgrpo's
sampler), once without and once with the LoRA, on the same per-image seeds (other seeds than
the trainer's evaluation), and scores both with the shapes verifier:

    python scripts/demo_lora_check.py --lora runs/demo/lora --out runs/demo/diffusers_check.json

Prints the per-tag table and the paired change of the overall with its 95% interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        images = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                      max_sequence_length=1, output_type="np", generator=gens).images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def run_base_model(lora: Path) -> str:
    """model.path of the training run a LoRA folder (RUN/lora) belongs to."""
    from omegaconf import OmegaConf

    config = lora.parent / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"no {config} beside the LoRA to read the base model from: pass --model")
    return str(OmegaConf.load(config).model.path)


def main() -> None:
    from diffusers import StableDiffusion3Pipeline

    from flowgrpo.data import load_prompts
    from flowgrpo.eval.shapes import accuracy_table, format_table, image_seeds, paired_difference_ci

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="base model folder (default: model.path of the run the LoRA came from, RUN/config.yaml)")
    ap.add_argument("--lora", required=True, help="a LoRA folder (e.g. runs/demo/lora)")
    ap.add_argument("--prompts", default="shapes:test")
    ap.add_argument("--tags", nargs="*", default=["colors", "counting"])
    ap.add_argument("--n", type=int, default=64, help="images per prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.0, help="1.0: CFG-free, as the demo evaluates")
    ap.add_argument("--seed", type=int, default=4242, help="not the trainer's evaluation seed")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        args.model = run_base_model(Path(args.lora))

    records = [it["metadata"] for it in load_prompts(args.prompts, args.tags)]
    expanded = [r for r in records for _ in range(args.n)]
    seeds = image_seeds(len(records), args.n, args.seed)
    prompts = [r["prompt"] for r in expanded]
    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    before = accuracy_table(sample(pipe, prompts, seeds, args.steps, args.guidance, args.batch), expanded)
    pipe.load_lora_weights(args.lora)
    after = accuracy_table(sample(pipe, prompts, seeds, args.steps, args.guidance, args.batch), expanded)
    d, lo, hi = paired_difference_ci(before["strict"], after["strict"], before["tags"])
    print(format_table({"base": before, "base+LoRA": after}))
    print(f"overall change {d:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}); diffusers __call__, {args.steps} steps, "
          f"guidance {args.guidance}, {args.n} images a prompt, seed {args.seed}")
    if args.out:
        slim = lambda t: {k: v for k, v in t.items() if k not in ("strict", "tags")}  # noqa: E731
        Path(args.out).write_text(json.dumps({"settings": vars(args), "before": slim(before), "after": slim(after),
                                              "change": {"overall": d, "ci95": [lo, hi]}}, indent=2))


if __name__ == "__main__":
    main()

"""Top-level commands: train, pretrain, distill, sample, bench."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _train(args) -> int:
    from .config import load_config
    from .train_config import TrainConfig, validate
    from .trainer import train

    cfg = validate(load_config(TrainConfig, args.config, args.overrides))
    summary = train(cfg, resume=(args.resume if args.resume != "latest" else True) if args.resume else None)
    if summary.get("change"):  # the main process's summary (the others hold no interval)
        from .eval.shapes import format_table

        print(format_table({"before": summary["before"], "after": summary["after"]}))
        ch = summary["change"]
        print(f"optim.policy_loss {cfg.optim.policy_loss}: overall change {ch['overall']:+.3f} "
              f"(95% CI {ch['ci95'][0]:+.3f} .. {ch['ci95'][1]:+.3f}), {summary['wall_seconds']:.0f} s; "
              f"LoRA and its model card: {summary['lora']}")
    return 0


def _pretrain(args) -> int:
    from .config import load_config
    from .worlds.shapes.pretrain import PretrainConfig, pretrain

    pretrain(load_config(PretrainConfig, args.config, args.overrides))
    return 0


def _distill(args) -> int:
    from .config import load_config
    from .worlds.shapes.distill import DistillConfig, distill

    distill(load_config(DistillConfig, args.config, args.overrides))
    return 0


def _sample(args) -> int:
    from PIL import Image

    from .data import load_prompts
    from .eval.shapes import sample_images
    from .models import load_policy
    from .models.sd3 import model_defaults
    from .runlog import image_grid

    if args.prompts:
        prompts = [it["prompt"] for it in load_prompts(args.prompts)]
    elif args.prompt:
        prompts = list(args.prompt)
    else:
        raise FileNotFoundError("give --prompt TEXT (repeatable) or --prompts FILE")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("float32" if device == "cpu" else "bfloat16")]
    policy = load_policy(args.model, args.backend, dtype, device, max_sequence_length=args.max_sequence_length,
                         cpu_offload=args.cpu_offload)
    if args.lora:
        policy.load_lora(args.lora, args.lora_scale)
    # the backend's defaults (FLUX.1-dev: 1024, guidance 3.5, 50 steps), then the model folder's own
    defaults = {**policy.sample_defaults(), **model_defaults(args.model)}
    size = args.size or defaults.get("resolution") or policy.default_resolution()
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance", 4.5)
    steps = args.steps or defaults.get("steps", 20)
    expanded = [p for p in prompts for _ in range(args.n)]
    seeds = [args.seed * 1_000_003 + i for i in range(len(expanded))]
    images = sample_images(policy, expanded, seeds, steps=steps, guidance=guidance, resolution=size,
                           batch_size=args.batch_size, progress=True, kind=args.solver)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"{i // args.n:04d}_{i % args.n}.png")
    scale = max(1, 128 // size)
    image_grid(images, args.n, prompts, scale=scale).save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


def _bench(args) -> int:
    from .bench import run_bench

    run_bench(args.config, args.overrides, args.iterations, remote_reward=args.remote_reward)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="online RL from a config (the objective is optim.policy_loss)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from the latest checkpoint in run.output_dir, or from a checkpoint folder")
    p.set_defaults(func=_train)

    p = sub.add_parser("pretrain", help="pretrain the shapes base model")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("distill", help="guidance-distil the shapes base with alt-text caption noise (the RL-ready base)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_distill)

    p = sub.add_parser("sample", help="sample images from a model (and LoRA)")
    p.add_argument("--model", default="assets/shapes-sd3", help="hub id or diffusers folder")
    p.add_argument("--backend", default="auto", choices=["auto", "sd3", "flux", "qwen_image", "flux2"],
                   help="auto: from model_index.json (hub ids: 'flux' in the name picks FLUX)")
    p.add_argument("--lora", default=None, help="LoRA folder (diffusers format)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiple of the trained strength (1 = as trained)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="prompt file: txt, jsonl or csv")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="ODE steps (default: FLUX 50, else 20; SD3.5 is evaluated with 40)")
    p.add_argument("--solver", choices=["ode", "dpm2"], default="ode",
                   help="deterministic sampler: ode (Euler) or dpm2 (DPM-Solver++(2M), DiffusionNFT's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (SD3) or embedded guidance (FLUX.1-dev: 3.5); default: the model's")
    p.add_argument("--size", type=int, default=None, help="height = width in pixels (default: the model's)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: SD3 256, FLUX 512)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep each model on the CPU until it runs: GPU memory peaks at the largest model "
                        "(FLUX.1-dev's transformer, 24 GB in bf16) instead of all of them (34 GB)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/samples")
    p.set_defaults(func=_sample)

    p = sub.add_parser("bench", help="time sampling, reward and update per iteration")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--remote-reward", metavar="URL", default=None,
                   help="score with the reward server at URL (`flowgrpo serve-reward`) instead of the config's rewards")
    p.set_defaults(func=_bench)

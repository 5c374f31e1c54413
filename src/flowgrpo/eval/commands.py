"""`flowgrpo eval ...`: the shapes table here; benchmark generation/scoring/report from
eval/benchmark_commands.py."""

from __future__ import annotations

import argparse


def _shapes(args) -> int:
    from ..data import load_prompts
    from ..models import load_policy
    from ..models.sd3 import model_defaults
    from ..worlds.shapes.grammar import validate_record
    from .shapes import evaluate_policy, format_table, write_json

    items = load_prompts(args.prompts, args.tags)
    records = [validate_record(it["metadata"]) if it["metadata"].get("include") else None for it in items]
    if any(r is None for r in records):
        from ..worlds.shapes.grammar import parse_prompt

        records = [r or parse_prompt(it["prompt"]) for r, it in zip(records, items)]
    policy = load_policy(args.model)
    if args.lora:
        policy.load_lora(args.lora, args.lora_scale)
    defaults = model_defaults(args.model)
    size = args.size or defaults.get("resolution") or policy.default_resolution()
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance", 4.5)
    table, _, _ = evaluate_policy(policy, records, images_per_prompt=args.n, steps=args.steps, guidance=guidance,
                                  resolution=size, seed=args.seed, batch_size=args.batch_size, progress=True,
                                  solver=args.solver)
    print(format_table({"strict": table}))
    if args.out:
        write_json(table, args.out)
        print(f"wrote {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate models: shapes table, benchmarks, reports")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("shapes", help="per-tag verifier accuracy on shapes prompts")
    p.add_argument("--model", default="assets/shapes-sd3")
    p.add_argument("--lora", default=None, help="a LoRA folder (a run's lora/ or a checkpoint's)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiple of the trained strength (1 = as trained)")
    p.add_argument("--prompts", default="shapes:test", help="shapes:test, shapes:train or a GenEval-schema jsonl")
    p.add_argument("--tags", nargs="*", default=None, help="keep only prompts with these GenEval tags")
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--solver", choices=["ode", "dpm2"], default="ode",
                   help="deterministic sampler: ode (Euler) or dpm2 (DPM-Solver++(2M), DiffusionNFT's)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.set_defaults(func=_shapes)
    try:
        from .benchmark_commands import add_eval_commands
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("flowgrpo"):
            raise
    else:
        add_eval_commands(esub)

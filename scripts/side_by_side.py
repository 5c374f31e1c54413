"""What the two benchmarks against official code paths share (bench_nft_official.py,
bench_flowgrpo_official.py): CPU-second clocks, sides that alternate iteration by iteration,
and one Markdown table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


# the attention projections both official recipes put their LoRA on
LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                "attn.to_out.0", "attn.to_q", "attn.to_v"]


def frozen_sd3(model: str):
    """(policy, pipe): the folder's StableDiffusion3Pipeline as flowgrpo's loader builds it (it
    fills absent T5 slots), every module frozen, for an official side to put its own LoRA on;
    the policy encodes the prompts for both sides."""
    from diffusers import StableDiffusion3Pipeline

    from flowgrpo.models import load_policy

    torch.manual_seed(0)
    policy = load_policy(model)
    pipe = policy.pipe
    assert isinstance(pipe, StableDiffusion3Pipeline)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        m.requires_grad_(False)
    return policy, pipe


def clock() -> float:
    """CPU seconds of this process: on a shared machine, unlike wall time, they do not count the
    time other jobs hold the cores (run with --threads 1 so no thread spins while it waits)."""
    return time.process_time()


def trainer_side(cfg, iterations: int):
    """flowgrpo's side: the Trainer's sample / score / update on `cfg`; yields the trained-parameter
    count, then (sampling, reward, update) CPU seconds of each of iterations + 1."""
    from flowgrpo.train_config import validate
    from flowgrpo.trainer import Trainer

    trainer = Trainer(validate(cfg))
    yield sum(p.numel() for p in trainer.named_params.values())
    for it in range(iterations + 1):
        t0 = clock()
        batch = trainer.sample(it)
        t1 = clock()
        adv, _ = trainer.score(batch)
        t2 = clock()
        trainer.update(batch, adv, it)
        t3 = clock()
        yield t1 - t0, t2 - t1, t3 - t2


def run_sides(sides: dict[str, Iterator], iterations: int, header: str) -> dict[str, list]:
    """Each side yields its trained-parameter count, then (sampling, reward, update) seconds per
    iteration. The sides alternate iteration by iteration, so a shared machine's load falls on
    both alike; the first iteration of each warms up and is not counted. Prints the table and
    returns each side's timed rows."""
    start = time.perf_counter()
    params = {name: next(gen) for name, gen in sides.items()}
    times: dict[str, list] = {name: [] for name in sides}
    for it in range(iterations + 1):
        for name, gen in sides.items():
            row = next(gen)
            if it:
                times[name].append(row)
    print(f"{header}, {iterations} timed iterations (alternating), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("CPU seconds an iteration:")
    print("| code | trained parameters | sampling | reward | update | total / iteration |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in sides:
        s, r, u = (float(np.mean(c)) for c in zip(*times[name]))
        print(f"| {name} | {params[name]:,} | {s:.2f} s | {r:.2f} s | {u:.2f} s | {s + r + u:.2f} s |")
    if len(sides) == 2:
        a, b = sides
        ratio = [sum(x) / sum(y) for x, y in zip(times[a], times[b])]
        update = [x[2] / y[2] for x, y in zip(times[a], times[b])]
        print(f"{a} / {b}, per iteration pair: total {', '.join(f'{x:.2f}' for x in ratio)}; "
              f"update {', '.join(f'{x:.2f}' for x in update)}")
    print(f"{time.perf_counter() - start:.0f} s wall in all")
    return times


def bench_main(doc: str, flowgrpo_side, official_side, *, checkout: str, official_name: str,
               default_batch: int) -> None:
    """The command line both benchmarks share: flowgrpo alone, or beside the official side when
    --official names a checkout of `checkout`."""
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default=str(root / "assets" / "shapes-sd3"))
    ap.add_argument("--official", default=None, help=f"a checkout of {checkout} (omit: flowgrpo only)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--batch", type=int, default=default_batch, help="images a forward pass, sampling and training")
    ap.add_argument("--iterations", type=int, default=2, help="timed iterations, after one warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU seconds are exact at 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sides = {"flowgrpo": flowgrpo_side(args)}
    if args.official:
        sides[official_name] = official_side(args)
    run_sides(sides, args.iterations, f"{args.prompts} prompts x {args.group} images, micro-batch {args.batch}")

"""When things happen in a run, as functions of its clocks: the learning rate by iteration, and
evaluations and the end by training CPU time (agreed by every process)."""

from __future__ import annotations

import math

import torch


def lr_factor(o, iteration: int) -> float:
    """The learning rate of `iteration` (0-based) as a share of optim.lr: linear warm-up over
    lr_warmup iterations, then constant, or cosine / linear decay to lr_min_ratio at optim.steps
    (over the last lr_decay_steps iterations when that is > 0)."""
    if iteration < o.lr_warmup:
        return (iteration + 1) / o.lr_warmup
    if o.lr_schedule == "constant":
        return 1.0
    # lr_decay_steps > 0: constant until the last lr_decay_steps iterations, which decay
    # (warmup-stable-decay: the anneal that lowers the update noise at the end, not all along)
    start = o.steps - o.lr_decay_steps if o.lr_decay_steps > 0 else o.lr_warmup
    if iteration < start:
        return 1.0
    progress = min(1.0, (iteration - start) / max(1, o.steps - start))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.lr_schedule == "cosine" else 1.0 - progress
    return o.lr_min_ratio + (1.0 - o.lr_min_ratio) * shape


def cpu_marks(run, before: float, after: float) -> tuple[bool, bool]:
    """(evaluate, stop) after an iteration moved the training CPU clock from `before` to `after`
    seconds: an evaluation each time a multiple of run.eval_every_cpu_minutes is passed, the end
    once run.max_cpu_minutes is reached."""
    every = 60.0 * run.eval_every_cpu_minutes
    evaluate = every > 0 and math.floor(after / every) > math.floor(before / every)
    return evaluate, run.max_cpu_minutes > 0 and after >= 60.0 * run.max_cpu_minutes


def main_process_value(acc, value: float) -> float:
    """The main process's `value` on every process: what is decided on it must agree everywhere."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast

    return float(broadcast(torch.tensor([value], dtype=torch.float64, device=acc.device)).item())

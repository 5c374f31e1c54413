"""What the two benchmarks against official code paths share (bench_nft_official.py,
bench_flowgrpo_official.py): CPU-second clocks, sides that alternate iteration by iteration,
and one Markdown table."""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch


def clock() -> float:
    """CPU seconds of this process: on a shared machine, unlike wall time, they do not count the
    time other jobs hold the cores (run with --threads 1 so no thread spins while it waits)."""
    return time.process_time()


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

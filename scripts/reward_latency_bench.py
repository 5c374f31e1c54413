"""Iteration time with rewards that take real time: our overlapped iteration, the reference
implementation's loop structure, and our sequential path, side by side in one run.

    python scripts/reward_latency_bench.py --iterations 3 --out docs/figures/reward_latency.json

Two rewards, each served by this project's own servers with a fixed latency (measurement
only): a pointwise reward of 50 ms an image (`flowgrpo serve-reward shapes_partial
--bench-latency 0.05`: one image at a time, as one reward model on one device) and a pairwise
judge of 0.2 s a comparison (`flowgrpo serve-judge --judge shapes --bench-latency 0.2
--bench-slots 16`: sixteen comparisons at a time, as a served VLM batches requests; the
trainer's `pref_winrate` reaches it as a `vlm` judge, all pairs of each group of 8).

Three loop structures, on the same config, each with its own trainer:
- overlap: `reward.overlap: true` (rewards/pipeline.py);
- reference: the structure of yifan123/flow_grpo's training loop, emulated here: after each
  sampling batch one job scoring that batch with every reward in turn goes to a pool of 8
  threads; the loop waits for all jobs when sampling ends;
- sequential: `reward.overlap: false`, every reward call after sampling.
Iterations interleave the three (iteration i of each before iteration i + 1 of any), so a
change in the machine's load hits them alike; the first iteration warms up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import numpy as np

from flowgrpo.config import load_config
from flowgrpo.rewards.pipeline import RewardPipeline, RewardRound, _Call, _timed_call
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


class ReferenceLoopRound(RewardRound):
    """One job per sampling batch on a shared pool, every reward in turn inside the job."""

    def add(self, positions, images, prompts, metadata) -> None:
        pos = np.arange(len(self.global_index))[positions]
        index, gids = self.global_index[pos], self.group_ids[pos]
        job = self.pool.submit(lambda: [_timed_call(r, images, list(prompts), list(metadata), gids)
                                        for r in self.rewards.values()])
        for k, name in enumerate(self.rewards):
            # collect() takes each reward's part of the job's result
            self.calls[name].append(_Call(index, partial(lambda j, k: j.result()[k], job, k)))


class ReferenceLoopPipeline(RewardPipeline):
    def __init__(self, rewards):
        super().__init__(rewards, overlap=False)
        self.pool = ThreadPoolExecutor(8)  # the reference's executor

    def begin(self, global_index, group_ids, group_size):
        rnd = ReferenceLoopRound(self, np.asarray(global_index), np.asarray(group_ids), group_size)
        rnd.pool = self.pool
        return rnd


def start_server(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "flowgrpo", *cmd, "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server {' '.join(cmd)} did not start on port {port}")


def iteration(trainer: Trainer, it: int) -> dict[str, float]:
    t0 = time.perf_counter()
    batch = trainer.sample(it)
    t1 = time.perf_counter()
    adv, stats = trainer.score(batch)
    t2 = time.perf_counter()
    trainer.update(batch, adv, it)
    t3 = time.perf_counter()
    return {"sample": t1 - t0, "reward_wait": t2 - t1, "to_advantages": t2 - t0, "update": t3 - t2, "total": t3 - t0,
            "reward_compute": stats["time/reward_compute"], "reward_mean": stats["reward/mean"]}


def run_scenario(name: str, config: str, overrides: list[str], iterations: int) -> dict:
    trainers = {}
    for variant in ("overlap", "reference", "sequential"):
        extra = [f"reward.overlap={'false' if variant == 'sequential' else 'true'}"]
        cfg = validate(load_config(TrainConfig, config, overrides + extra))
        trainers[variant] = Trainer(cfg)
        if variant == "reference":
            trainers[variant].reward_pipeline = ReferenceLoopPipeline(trainers[variant].rewards)
    rows = {v: [] for v in trainers}
    for it in range(iterations + 1):
        for variant, trainer in trainers.items():
            row = iteration(trainer, it)
            print(f"{name} {variant:10s} it {it}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
            if it:
                rows[variant].append(row)
    means = {v: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for v, rs in rows.items()}
    reward_time = means["sequential"]["reward_wait"]  # every reward call, nothing hidden
    for m in means.values():
        m["wait_share"] = m["reward_wait"] / reward_time
        m["vs_sequential"] = m["total"] / means["sequential"]["total"]
        # the update does not depend on the loop structure; on a shared machine its time is the noisiest part
        m["to_advantages_vs_sequential"] = m["to_advantages"] / means["sequential"]["to_advantages"]
    return {"scenario": name, "config": config, "overrides": overrides, "iterations": iterations, "means": means,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/shapes_flowgrpo.yaml")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="images per sampling batch (4 batches of 64)")
    ap.add_argument("--image-latency", type=float, default=0.05)
    ap.add_argument("--comparison-latency", type=float, default=0.2)
    ap.add_argument("--judge-slots", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per trainer (run.threads)")
    ap.add_argument("--scenarios", nargs="+", default=["served", "judge"])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    base = [f"sample.batch_size={args.batch_size}", f"run.threads={args.threads}", "run.tensorboard=false", "run.output_dir=runs/reward_latency"]
    servers, results = [], []
    try:
        if "served" in args.scenarios:
            servers.append(start_server(["serve-reward", "shapes_partial", "--bench-latency", str(args.image_latency),
                                         "--log-level", "warning"], 8761))
            results.append(run_scenario(f"served reward, {args.image_latency * 1000:.0f} ms an image", args.config,
                                        base + ["reward.weights={remote:http://127.0.0.1:8761: 1.0}"],
                                        args.iterations))
        if "judge" in args.scenarios:
            servers.append(start_server(["serve-judge", "--judge", "shapes", "--bench-latency",
                                         str(args.comparison_latency), "--bench-slots", str(args.judge_slots)], 8762))
            judge = "{pref_winrate: {judge: vlm, judge_args: {base_url: 'http://127.0.0.1:8762/v1'}}}"
            results.append(run_scenario(f"pairwise judge, {args.comparison_latency} s a comparison", args.config,
                                        base + ["reward.weights={pref_winrate: 1.0}", f"reward.args={judge}"],
                                        args.iterations))
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=10)
    print("\n| reward | loop | sampling | reward wait | wait / reward time | sampling + wait | vs sequential "
          "| update | total / iteration | vs sequential |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for res in results:
        for variant, m in res["means"].items():
            print(f"| {res['scenario']} | {variant} | {m['sample']:.2f} s | {m['reward_wait']:.2f} s | "
                  f"{m['wait_share']:.0%} | {m['to_advantages']:.2f} s | {m['to_advantages_vs_sequential']:.2f}x | "
                  f"{m['update']:.2f} s | {m['total']:.2f} s | {m['vs_sequential']:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": args.threads, "results": results},
                                             indent=1))


if __name__ == "__main__":
    main()

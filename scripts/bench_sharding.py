"""DDP against FSDP2 on 2 CPU processes (gloo): seconds per iteration and peak resident memory
per process, on make demo's config (or any config).

    python scripts/bench_sharding.py [--iterations 4] [--config configs/demo.yaml] [k=v ...]
    python scripts/bench_sharding.py --random-sd3     # full fine-tune + KL + EMA of a 40M-parameter SD3

The first iteration is left out of the timing (start-up). Results: docs/performance.md."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import json, resource, sys
from flowgrpo.config import load_config
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train
import torch.distributed as dist
train(validate(load_config(TrainConfig, sys.argv[1], sys.argv[2:])))
rank = dist.get_rank() if dist.is_initialized() else 0
print("PEAK", rank, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def run(strategy: str, config: str, overrides: list[str], out: Path, iterations: int) -> dict:
    driver = out.parent / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    args = [config, *overrides, f"optim.steps={iterations}", "run.eval_before=false", "data.test=",
            "run.tensorboard=false", "run.threads=1", f"parallel.strategy={strategy}", f"run.output_dir={out}"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend",
                          "c10d", "--rdzv_endpoint", "127.0.0.1:0", str(driver), *args],
                         env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    peaks = sorted((int(r), int(kb) * 1024) for _, r, kb in
                   (line.split() for line in res.stdout.splitlines() if line.startswith("PEAK")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/update" in r][1:]  # the first iteration pays start-up
    parts = {k: float(np.mean([r[f"time/{k}"] for r in rows])) for k in ("sample", "reward", "update")}
    return {**parts, "iteration": sum(parts.values()), "peak_rss": [p for _, p in peaks]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--random-sd3", action="store_true",
                    help="the random SD3 of scripts/plan_check.py, fully fine-tuned: weights dominate memory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config, overrides = args.config, list(args.overrides)
        if args.random_sd3:
            sys.path.insert(0, str(ROOT / "scripts"))
            from flowgrpo.config import load_config, save_config
            from flowgrpo.train_config import TrainConfig
            from plan_check import RANDOM_SD3_FULL, build_random_sd3

            model = build_random_sd3(Path(tmp))
            config = str(Path(tmp) / "random.yaml")
            save_config(load_config(TrainConfig, None, RANDOM_SD3_FULL + [f"model.path={model}",
                                                                           "sample.prompts_per_step=2"]), config)
        results = {s: run(s, config, overrides, Path(tmp) / s, args.iterations) for s in ("ddp", "fsdp2")}
    print(f"{'strategy':<10}{'sample s':>10}{'reward s':>10}{'update s':>10}{'iteration s':>13}"
          f"{'peak RSS rank 0 / 1 (GB)':>28}")
    for s, r in results.items():
        rss = " / ".join(f"{p / 1e9:.3f}" for p in r["peak_rss"])
        print(f"{s:<10}{r['sample']:>10.2f}{r['reward']:>10.3f}{r['update']:>10.2f}{r['iteration']:>13.2f}{rss:>28}")


if __name__ == "__main__":
    main()

"""Held-out accuracy against training seconds and images, for runs of `flowgrpo train`.

    python scripts/methods_figure.py --out docs/figures/methods_curves.png \
        "NFT [0.8,1], seed 0=runs/demo" "ratio, seed 0=runs/ratio_s0" ...

Each argument is LABEL=RUN_DIR. Runs with the same label before ", seed" share a colour.
Training seconds are the sum of the sampling, reward and update times the trainer logs
(evaluations excluded); images are iterations x the batch of the run's config. Prints one row
per run: the held-out overall at each evaluation and the change at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path) -> tuple[list[float], list[int], list[float]]:
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig

    cfg = load_config(TrainConfig, run / "config.yaml")
    per_iteration = cfg.sample.group_size * cfg.sample.prompts_per_step
    seconds, images, acc, elapsed = [], [], [], 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        elapsed += sum(v for k, v in m.items() if k in ("time/sample", "time/reward", "time/update"))
        if "eval/overall" in m:
            seconds.append(elapsed)
            images.append(m["step"] * per_iteration)
            acc.append(m["eval/overall"])
    return seconds, images, acc


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    ap.add_argument("--out", default="methods_curves.png")
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours: dict[str, str] = {}
    for spec in args.runs:
        label, _, path = spec.partition("=")
        seconds, images, acc = curve(Path(path))
        family = label.split(", seed")[0]
        colour = colours.setdefault(family, f"C{len(colours)}")
        for ax, x in zip(axes, (seconds, images)):
            ax.plot(x, acc, marker="o", color=colour, label=label if ax is axes[0] else None, alpha=0.85)
        points = " / ".join(f"{a:.3f}" for a in acc)
        print(f"{label:<40} {points}   change {acc[-1] - acc[0]:+.3f}   {seconds[-1]:.0f} s of training")
    axes[0].set_xlabel("training seconds (sampling + reward + update)")
    axes[1].set_xlabel("images sampled")
    axes[0].set_ylabel("held-out strict (20-step ODE, CFG-free)")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

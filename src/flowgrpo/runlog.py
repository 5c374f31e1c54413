"""Run logging: a metrics JSONL (always), TensorBoard and wandb (when asked and installed),
image grids, and the end-of-run plot of reward and held-out accuracy against step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


class MetricsLogger:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True, wandb: bool = False,
                 config: dict | None = None, resume: bool = False):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                self.tb = None
        self.wandb = None
        if wandb:
            import wandb as _wandb

            self.wandb = _wandb.init(project="flowgrpo", config=config, dir=str(self.dir), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                 for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for k, v in clean.items():
            if isinstance(v, float) and math.isfinite(v):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, float)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def image_grid(images: np.ndarray, cols: int, labels: list[str] | None = None, scale: int = 1) -> Image.Image:
    """uint8 (N, H, W, 3) -> one PIL grid; optional one label per row drawn above it."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (cols * w * scale, rows * (h * scale + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y = r * (h * scale + label_h)
        tile = Image.fromarray(img)
        if scale != 1:
            tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, (c * w * scale, y + label_h))
        if labels and c == 0 and r < len(labels):
            draw.text((2, y), labels[r][: cols * w * scale // 6], fill=(0, 0, 0))
    return grid


def plot_run(metrics: list[dict], out: str | Path, reward_key: str = "reward/mean",
             eval_key: str = "eval/overall", objective: str | None = None) -> Path:
    """Training reward and held-out accuracy against iteration; `objective` (optim.policy_loss)
    titles the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    watched = any(k.startswith(("gold/", "alarm/")) for m in metrics for k in m)
    fig, ax = plt.subplots(1, 3 if watched else 2, figsize=(15 if watched else 10, 3.5))
    tr = [(m["step"], m[reward_key]) for m in metrics if reward_key in m]
    if tr:
        ax[0].plot(*zip(*tr), marker=".", lw=1)
    ax[0].set_xlabel("iteration")
    ax[0].set_ylabel(reward_key)
    ax[0].set_title("training reward")
    ev = [(m["step"], m[eval_key]) for m in metrics if eval_key in m]
    if ev:
        ax[1].plot(*zip(*ev), marker="o")
    ax[1].set_xlabel("iteration")
    ax[1].set_ylabel(eval_key)
    ax[1].set_title("held-out accuracy")
    if watched:
        plot_watch(ax[2], metrics, reward_key)
    if objective:
        fig.suptitle(f"optim.policy_loss: {objective}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_watch(ax, metrics: list[dict], reward_key: str = "reward/mean") -> None:
    """The optimised reward against the gold one (each as its change from its first value, so
    both fit one axis), with a red band at every iteration where an alarm fired."""
    for key, style in ((reward_key, "-"), ("gold/total", "--")):
        pts = [(m["step"], m[key]) for m in metrics if key in m]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, np.asarray(values) - values[0], style, marker=".", lw=1, label=f"{key} - first")
    fired = sorted({m["step"] for m in metrics if any(k.startswith("alarm/") and m[k] for k in m)})
    for step in fired:
        ax.axvspan(step - 0.5, step + 0.5, color="red", alpha=0.15, lw=0)
    names = sorted({k[len("alarm/"):] for m in metrics for k in m if k.startswith("alarm/") and m[k]})
    ax.set_title("proxy vs gold" + (f"; alarms: {', '.join(names)}" if names else "; no alarm"), fontsize=9)
    ax.set_xlabel("iteration")
    ax.legend(fontsize=8)

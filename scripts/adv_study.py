"""Adv-GRPO on the shapes world: the adversarial reward alone and mixed with the verifier.

References are the renderer's scenes for each training prompt. For each run: held-out
verifier accuracy, how close object size and saturation come to the references', and
whether the reward is hacked (the generator's adversarial reward rising while held-out
accuracy falls), with the discriminator's own metrics per iteration.

    python scripts/adv_study.py --steps 40
writes runs/study_adv/*, docs/figures/adv_*.png and a Markdown table on stdout
(pasted into docs/adv-grpo.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from reward_hacking_study import ROOT, drift

ADV = "adversarial: {backbone: shapes, references: shapes, lr: 0.001}"
CONDITIONS = {
    "adversarial": ["reward.weights={adversarial: 1.0}", "reward.args={" + ADV + "}"],
    "adversarial+verifier": ["reward.weights={adversarial: 1.0, shapes_partial: 1.0}", "reward.args={" + ADV + "}"],
}


def main() -> None:
    from flowgrpo.config import load_config
    from flowgrpo.runlog import read_metrics
    from flowgrpo.train_config import TrainConfig, validate
    from flowgrpo.trainer import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-steps", type=int, default=1)
    ap.add_argument("--d-period", type=int, default=2)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--model", default=str(ROOT / "assets" / "shapes-sd3"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "study_adv"))
    args = ap.parse_args()
    out_root = Path(args.out)
    base = drift(None, args.model, 0)
    rows, curves = [], {}
    for cond, overrides in CONDITIONS.items():
        out = out_root / cond.replace("+", "_")
        ov = overrides + [f"run.seed={args.seed}", f"optim.steps={args.steps}", f"run.output_dir={out}",
                          "run.eval_before=false", "run.tensorboard=false", "run.eval_images_per_prompt=4",
                          f"reward.d_steps={args.d_steps}", f"reward.d_period={args.d_period}"]
        if not (out / "summary.json").exists():
            train(validate(load_config(TrainConfig, ROOT / args.config, ov)))
        d = drift(out, args.model, args.seed)
        m = read_metrics(out / "metrics.jsonl")
        curves[cond] = m
        gen = [r for r in m if "reward/adversarial/mean" in r]
        first, last = gen[: max(1, len(gen) // 5)], gen[-max(1, len(gen) // 5):]
        disc = [r for r in m if "disc/adversarial/d_loss" in r]
        rows.append({"condition": cond, **d,
                     "adv_reward_first": float(np.mean([r["reward/adversarial/mean"] for r in first])),
                     "adv_reward_last": float(np.mean([r["reward/adversarial/mean"] for r in last])),
                     "d_acc_last": float(np.mean([(r["disc/adversarial/acc_ref"] + r["disc/adversarial/acc_gen"]) / 2
                                                  for r in disc[-3:]])) if disc else float("nan")})
    (out_root / "results.json").write_text(json.dumps({"base": base, "runs": rows}, indent=1))
    _plot(curves)
    print(f"base model: strict {base['strict']:.3f}, size {base['size']:.3f} (renderer {base['size_ref']:.3f}), "
          f"saturation {base['saturation']:.3f} (renderer {base['saturation_ref']:.3f})\n")
    print("| condition | held-out strict | object size (references) | saturation (references) | "
          "adversarial reward, first -> last fifth | discriminator accuracy (last) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['condition']} | {r['strict']:.3f} | {r['size']:.3f} ({r['size_ref']:.3f}) | "
              f"{r['saturation']:.3f} ({r['saturation_ref']:.3f}) | {r['adv_reward_first']:+.3f} -> "
              f"{r['adv_reward_last']:+.3f} | {r['d_acc_last']:.2f} |")


def _plot(curves) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = ROOT / "docs" / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    for cond, m in curves.items():
        g = [r for r in m if "reward/adversarial/mean" in r]
        ax[0].plot([r["step"] for r in g], [r["reward/adversarial/mean"] for r in g], label=cond)
        d = [r for r in m if "disc/adversarial/d_loss" in r]
        ax[1].plot([r["step"] for r in d], [r["disc/adversarial/d_loss"] for r in d], label=cond)
        s = [r for r in m if "reward/adversarial/mean" in r]
        key = "reward/shapes_partial/strict"
        ax[2].plot([r["step"] for r in s if key in r], [r[key] for r in s if key in r], label=cond)
    ax[0].set_title("generator's adversarial reward")
    ax[1].set_title("discriminator hinge loss")
    ax[2].set_title("train-sample verifier strict (when logged)")
    for a in ax:
        a.set_xlabel("iteration")
        a.legend()
    fig.tight_layout()
    fig.savefig(figdir / "adv_curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

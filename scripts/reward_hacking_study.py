"""Pref-GRPO's reward-hacking claim in miniature, on the shapes world.

Two conditions, same budget and seeds:
  pointwise  the reward is a biased scorer: verifier partial credit + `bias` x object size
  pairwise   the reward is the win rate from a judge with the same bias: a pair goes to
             the image with the higher biased score (Bradley-Terry with a small tau)
For each run we log reward std and advantage spread per iteration (metrics.jsonl), and at
the end measure true quality with the verifier (strict, held-out) and how far object size
and saturation drift from the renderer's scenes for the same prompts.

    python scripts/reward_hacking_study.py --seeds 0 1 2 --steps 40
writes runs/study_hacking/*, docs/figures/hacking_*.png and a Markdown table on stdout
(pasted into docs/pref-grpo.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = {
    "pointwise": ["reward.weights={shapes_biased: 1.0}", "reward.args={shapes_biased: {bias: BIAS}}"],
    "pairwise": ["reward.weights={pref_winrate: 1.0}",
                 "reward.args={pref_winrate: {judge: bradley_terry, judge_args: "
                 "{reward: shapes_biased, reward_args: {bias: BIAS}, tau: 0.002}}}"],
}


def run_one(condition: str, seed: int, steps: int, bias: float, out_root: Path, base_config: str) -> dict:
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig, validate
    from flowgrpo.trainer import train

    out = out_root / f"{condition}-seed{seed}"
    overrides = [o.replace("BIAS", str(bias)) for o in CONDITIONS[condition]] + [
        f"run.seed={seed}", f"optim.steps={steps}", f"run.output_dir={out}", "run.eval_before=false",
        "run.tensorboard=false", "run.eval_images_per_prompt=4"]
    if not (out / "summary.json").exists():
        train(validate(load_config(TrainConfig, ROOT / base_config, overrides)))
    return {"dir": out, "summary": json.loads((out / "summary.json").read_text())}


def drift(run_dir: Path, model: str, seed: int) -> dict:
    """Object size and saturation of held-out samples vs the renderer's scenes."""
    from flowgrpo.eval.shapes import evaluate_policy
    from flowgrpo.models import load_policy
    from flowgrpo.rewards.shapes import image_statistics
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.render import render_batch

    recs = split_records()["test"]
    policy = load_policy(model)
    if run_dir is not None:
        policy.load_lora(run_dir / "lora")
    table, images, expanded = evaluate_policy(policy, recs, images_per_prompt=4, steps=20, guidance=1.0,
                                              resolution=32, seed=1234)
    gen = image_statistics(images)
    ref = image_statistics(render_batch(expanded, seed=99))
    return {"strict": table["overall"], "size": float(gen["size"].mean()), "size_ref": float(ref["size"].mean()),
            "saturation": float(gen["saturation"].mean()), "saturation_ref": float(ref["saturation"].mean())}


def main() -> None:
    from flowgrpo.runlog import read_metrics

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--bias", type=float, default=0.5)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--model", default=str(ROOT / "assets" / "shapes-sd3"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "study_hacking"))
    args = ap.parse_args()
    out_root = Path(args.out)
    rows, curves = [], {}
    base = drift(None, args.model, 0)
    for cond in CONDITIONS:
        for seed in args.seeds:
            res = run_one(cond, seed, args.steps, args.bias, out_root, args.config)
            d = drift(res["dir"], args.model, seed)
            m = read_metrics(res["dir"] / "metrics.jsonl")
            train_rows = [r for r in m if "adv/std" in r]
            amp = [r.get("adv/amplification", np.nan) for r in train_rows]
            rows.append({"condition": cond, "seed": seed, **d,
                         "reward_std": float(np.mean([r["reward/std"] for r in train_rows])),
                         "group_reward_std": float(np.nanmean([r.get("reward/group_std", np.nan) for r in train_rows])),
                         "adv_std": float(np.mean([r["adv/std"] for r in train_rows])),
                         "amplification": float(np.nanmean(amp))})
            curves[(cond, seed)] = train_rows
    (out_root / "results.json").write_text(json.dumps({"base": base, "runs": rows}, indent=1))
    _plots(curves, rows, base)
    print(f"base model: strict {base['strict']:.3f}, size {base['size']:.3f} (renderer {base['size_ref']:.3f}), "
          f"saturation {base['saturation']:.3f} (renderer {base['saturation_ref']:.3f})\n")
    print("| condition | seed | held-out strict | object size (renderer) | saturation (renderer) | reward std | "
          "within-group reward std | advantage std | amplification |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['condition']} | {r['seed']} | {r['strict']:.3f} | {r['size']:.3f} ({r['size_ref']:.3f}) | "
              f"{r['saturation']:.3f} ({r['saturation_ref']:.3f}) | {r['reward_std']:.3f} | "
              f"{r['group_reward_std']:.3f} | {r['adv_std']:.2f} | {r['amplification']:.1f} |")
    for cond in CONDITIONS:
        sel = [r for r in rows if r["condition"] == cond]
        print(f"| **{cond} mean** | | {np.mean([r['strict'] for r in sel]):.3f} | "
              f"{np.mean([r['size'] for r in sel]):.3f} | {np.mean([r['saturation'] for r in sel]):.3f} | "
              f"{np.mean([r['reward_std'] for r in sel]):.3f} | {np.mean([r['group_reward_std'] for r in sel]):.3f} | "
              f"{np.mean([r['adv_std'] for r in sel]):.2f} | {np.mean([r['amplification'] for r in sel]):.1f} |")


def _plots(curves, rows, base) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = ROOT / "docs" / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    colors = {"pointwise": "tab:red", "pairwise": "tab:blue"}
    for (cond, seed), m in curves.items():
        steps = [r["step"] for r in m]
        ax[0].plot(steps, [r.get("reward/group_std", np.nan) for r in m], color=colors[cond], alpha=0.6,
                   label=cond if seed == min(s for c, s in curves if c == cond) else None)
        ax[1].plot(steps, [r.get("adv/amplification", np.nan) for r in m], color=colors[cond], alpha=0.6)
        key = "reward/shapes_biased/size" if cond == "pointwise" else None
        ax[2].plot(steps, [r.get("reward/shapes_biased/strict", r.get("reward/mean", np.nan)) if key else np.nan
                           for r in m], color=colors[cond], alpha=0.6)
    ax[0].set_title("within-group reward std")
    ax[1].set_title("advantage std / reward std (amplification)")
    ax[1].set_yscale("log")
    ax[2].set_title("pointwise: train-sample strict accuracy")
    ax[0].legend()
    for a in ax:
        a.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(figdir / "hacking_curves.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for i, (metric, label) in enumerate([("strict", "held-out strict accuracy"), ("size", "object size (share of image)")]):
        for j, cond in enumerate(colors):
            vals = [r[metric] for r in rows if r["condition"] == cond]
            ax[i].scatter([j] * len(vals), vals, color=colors[cond])
            ax[i].bar(j, np.mean(vals), color=colors[cond], alpha=0.3)
        ax[i].axhline(base[metric], color="k", ls="--", label="base model")
        if metric == "size":
            ax[i].axhline(base["size_ref"], color="gray", ls=":", label="renderer")
        ax[i].set_xticks(range(len(colors)), list(colors))
        ax[i].set_title(label)
        ax[i].legend()
    fig.tight_layout()
    fig.savefig(figdir / "hacking_outcomes.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

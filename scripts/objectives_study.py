"""Which objective moves the shapes model, and how fast: one tag, in-distribution, same budget.

Every condition trains configs/probe_colors.yaml (full fine-tuning, the 8 `colors` training
prompts, 64 images an iteration) with one objective and is evaluated on those same prompts
with the evaluation sampler (20-step ODE, CFG-free, 16 images a prompt, fixed seeds) every
10 iterations. `supervised` (flow matching on renders of the prompts) is the ceiling of the
update path; the rest learn from the model's own samples and the verifier.

    python scripts/objectives_study.py --seeds 0 1            # the whole grid; finished runs are reused
    python scripts/objectives_study.py --only nft supervised  # a subset
    python scripts/objectives_study.py --report               # table and figure of every finished run

writes runs/study_objectives/<condition>-seed<k>/, docs/figures/objectives_curves.png and a
Markdown table on stdout (docs/results/objectives.md). Set --threads 1 to run two studies side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/probe_colors.yaml"
DEMO_TARGETS = ("[attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,"
                "attn.to_add_out,ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2,norm1.linear,"
                "norm1_context.linear]")
# name -> overrides on top of CONFIG
CONDITIONS = {
    "supervised": ["optim.policy_loss=supervised"],
    "reward_filtered": ["optim.policy_loss=reward_filtered", "optim.rf_select=best"],
    # flow matching on every own sample, whatever its reward: the control for what own samples teach
    "self_training": ["optim.policy_loss=reward_filtered", "optim.rf_select=all", "optim.drop_zero_signal=false"],
    "nft": ["optim.policy_loss=nft"],
    "nft_lr1e-4": ["optim.policy_loss=nft", "optim.lr=1e-4"],
    # anchored against the drift of own samples: the velocity-space KL to the base, weight 1
    "nft_kl1": ["optim.policy_loss=nft", "optim.nft_kl_weight=1.0"],
    "nft_kl0.1": ["optim.policy_loss=nft", "optim.nft_kl_weight=0.1"],
    "reward_filtered_kl1": ["optim.policy_loss=reward_filtered", "optim.rf_select=best", "optim.kl_beta=1.0"],
    # the update path: the demo's LoRA (gaussian A, std 1/r) against peft's default Kaiming A
    "supervised_lora_gauss": ["optim.policy_loss=supervised", "model.lora.enabled=true", "optim.lr=1e-3",
                              f"model.lora.targets={DEMO_TARGETS}", "model.lora.init=gaussian"],
    "supervised_lora_kaiming": ["optim.policy_loss=supervised", "model.lora.enabled=true", "optim.lr=1e-3",
                                f"model.lora.targets={DEMO_TARGETS}", "model.lora.init=kaiming"],
    "ratio_sde": ["optim.policy_loss=ratio", "sample.kind=flow_sde", "sample.noise_level=0.8",
                  "optim.clip_range=1e-3", "optim.timestep_fraction=1.0"],
}


def run_one(name: str, seed: int, out_root: Path, threads: int, extra: list[str]) -> Path:
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig, validate
    from flowgrpo.trainer import train

    out = out_root / f"{name}-seed{seed}"
    if not (out / "summary.json").exists():
        overrides = CONDITIONS[name] + [f"run.seed={seed}", f"run.output_dir={out}", f"run.threads={threads}",
                                        *extra]
        train(validate(load_config(TrainConfig, ROOT / CONFIG, overrides)))
    return out


def curve(run: Path) -> list[tuple[int, float]]:
    from flowgrpo.runlog import read_metrics

    return [(int(m["step"]), float(m["eval/overall"])) for m in read_metrics(run / "metrics.jsonl")
            if "eval/overall" in m]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", nargs="*", default=None, help="conditions to run (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    ap.add_argument("--out", default=str(ROOT / "runs" / "study_objectives"))
    ap.add_argument("--report", action="store_true", help="train nothing: tabulate every finished run in --out")
    args = ap.parse_args()
    names = args.only or list(CONDITIONS)
    out_root = Path(args.out)
    if args.report:
        done = [(n, s) for n in names for s in range(100) if (out_root / f"{n}-seed{s}" / "summary.json").exists()]
    else:
        done = [(n, s) for n in names for s in args.seeds]
    names = list(dict.fromkeys(n for n, _ in done))
    rows = []
    for name, seed in done:
        run = run_one(name, seed, out_root, args.threads, args.set)  # reuses a finished run
        summary = json.loads((run / "summary.json").read_text())
        c = curve(run)
        rows.append({"condition": name, "seed": seed, "curve": c, "before": c[0][1], "after": c[-1][1],
                     "wall": summary.get("wall_seconds", float("nan"))})
    (out_root / "results.json").write_text(json.dumps(rows, indent=1))
    _plot(rows)
    print("| objective | seeds | before (each seed) | after 40 iterations | change, mean | wall per run (1 thread, shared) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in names:
        sel = [r for r in rows if r["condition"] == name]
        d = [r["after"] - r["before"] for r in sel]
        befores = " / ".join(f"{r['before']:.3f}" for r in sel)
        afters = " / ".join(f"{r['after']:.3f}" for r in sel)
        print(f"| {name} | {len(sel)} | {befores} | {afters} | "
              f"{np.mean(d):+.3f} | {np.mean([r['wall'] for r in sel]):.0f} s |")


def _plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = list(dict.fromkeys(r["condition"] for r in rows))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        for r in rows:
            if r["condition"] == name:
                x, y = zip(*r["curve"])
                ax.plot(np.asarray(x) * 64, y, color=cmap(i), alpha=0.8, marker="o", ms=3,
                        label=name if r["seed"] == min(rr["seed"] for rr in rows if rr["condition"] == name) else None)
    ax.set_xlabel("images sampled")
    ax.set_ylabel("colors train prompts, strict (20-step ODE, CFG-free)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "objectives_curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

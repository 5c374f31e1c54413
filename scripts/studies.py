"""The three methods side by side on the shapes world (docs/results/three-methods.md).

Every condition is `configs/demo.yaml` with model.path=assets/shapes-sd3-alt (DiffusionNFT, CFG-free) with
another reward, trained for --steps iterations (default 120: 1.5x the demo's images) and
evaluated on the demo's held-out prompts every 40 iterations. Only the reward changes:

    verifier             the verifier's partial credit (Flow-GRPO's pointwise reward; the control)
    pointwise_biased     partial credit + 0.5 x object size, group-normalised (an exploitable scorer)
    pairwise_biased      win rate under a judge over that same biased score (Pref-GRPO's defence)
    pairwise             win rate under a judge over the verifier (Pref-GRPO)
    adversarial          a discriminator on frozen features (assets/shapes-dinov2), renders positive (Adv-GRPO alone)
    adversarial_random, adversarial_verifier_random   the same on the seeded random backbone
    adversarial_verifier discriminator + verifier, mixed by reward (Adv-GRPO), both updated every iteration
    adversarial_verifier_paper   the same with the paper's schedule (discriminator only, 9 of 10 iterations)
    adversarial_verifier_advmix  the same two, mixed by advantage
    pairwise_adversarial judge win rate + discriminator, mixed by advantage

    python scripts/studies.py run hacking          # verifier, pointwise_biased, pairwise_biased
    python scripts/studies.py run discriminator    # verifier, the adversarial reward alone and with it, two backbones
    python scripts/studies.py run methods          # the three methods and their mixes
    python scripts/studies.py run hacking discriminator   # both as one grid (the verifier runs once)
    python scripts/studies.py run adversarial --seeds 0   # one condition, one seed
    python scripts/studies.py report all           # tables (Markdown, stdout) and docs/figures/study_*.png

`run` trains the missing (condition, seed) runs, --workers at a time with one thread each,
resumes a run interrupted mid-way from its checkpoint, and writes one small JSON record per
finished run to docs/studies/ (committed): a later rerun reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "studies"
RUNS = ROOT / "runs" / "studies"
# The base of every recorded run: configs/demo.yaml trains another base, the free-layout studies do not.
BASE = "assets/shapes-sd3-alt"
BIAS = 0.5  # object size is 0.1-0.3 of the image: a bonus of a few hundredths, below one verifier check
JUDGE_TAU = 0.05  # a size gap of 0.03 is a 57/43 call; one failed check (0.25+) is 99/1
MONITOR = "shapes_partial: 0.0"  # logged, not trained on: the train samples' verifier accuracy
# the discriminator's frozen features: the tiny DINOv2 trained on renders here (assets/shapes-dinov2,
# flowgrpo.worlds.shapes.backbone); the seeded random one left the head near chance (the *_random rows)
ADV = "adversarial: {backbone: assets/shapes-dinov2, references: shapes, lr: 0.001}"
ADV_RANDOM = "adversarial: {backbone: shapes, references: shapes, lr: 0.001}"
BIASED_JUDGE = ("pref_winrate: {judge: bradley_terry, judge_args: {reward: shapes_biased, "
                f"reward_args: {{bias: {BIAS}}}, tau: {JUDGE_TAU}, sample: true}}}}")
CONDITIONS = {
    "verifier": [],
    "pointwise_biased": ["reward.weights={shapes_biased: 1.0, " + MONITOR + "}",
                         f"reward.args={{shapes_biased: {{bias: {BIAS}}}}}"],
    "pairwise_biased": ["reward.weights={pref_winrate: 1.0, " + MONITOR + "}", "reward.args={" + BIASED_JUDGE + "}"],
    "pairwise": ["reward.weights={pref_winrate: 1.0, " + MONITOR + "}",
                 "reward.args={pref_winrate: {judge: shapes}}"],
    "adversarial": ["reward.weights={adversarial: 1.0, " + MONITOR + "}", "reward.args={" + ADV + "}"],
    "adversarial_verifier": ["reward.weights={adversarial: 1.0, shapes_partial: 1.0}", "reward.args={" + ADV + "}"],
    "adversarial_random": ["reward.weights={adversarial: 1.0, " + MONITOR + "}", "reward.args={" + ADV_RANDOM + "}"],
    "adversarial_verifier_random": ["reward.weights={adversarial: 1.0, shapes_partial: 1.0}",
                                    "reward.args={" + ADV_RANDOM + "}"],
    # Adv-GRPO's own schedule: the discriminator alone on 9 of every 10 iterations
    "adversarial_verifier_paper": ["reward.weights={adversarial: 1.0, shapes_partial: 1.0}", "reward.args={" + ADV + "}",
                                   "reward.d_steps=9", "reward.d_period=10"],
    "adversarial_verifier_advmix": ["reward.weights={adversarial: 1.0, shapes_partial: 1.0}",
                                    "reward.args={" + ADV + "}", "reward.mix=advantage"],
    "pairwise_adversarial": ["reward.weights={pref_winrate: 1.0, adversarial: 1.0, " + MONITOR + "}",
                             "reward.args={pref_winrate: {judge: shapes}, " + ADV + "}", "reward.mix=advantage"],
}
STUDIES = {  # in the order `run all` trains them, seed by seed
    "hacking": ["verifier", "pointwise_biased", "pairwise_biased"],
    "discriminator": ["verifier", "adversarial_verifier", "adversarial", "adversarial_verifier_paper",
                      "adversarial_random", "adversarial_verifier_random"],
    "methods": ["verifier", "pairwise", "adversarial_verifier", "adversarial_verifier_advmix", "pairwise_adversarial"],
}
# paired differences (a - b, seed by seed) each study reports, with "shown" when the 95% interval excludes 0
CONTRASTS = {
    "hacking": [("pairwise_biased", "pointwise_biased"), ("pointwise_biased", "verifier"),
                ("pairwise_biased", "verifier")],
    "discriminator": [("adversarial_verifier", "verifier"), ("adversarial", "verifier"),
                      ("adversarial_verifier_paper", "adversarial_verifier"),
                      ("adversarial_verifier", "adversarial_verifier_random"), ("adversarial", "adversarial_random")],
    "methods": [("pairwise", "verifier"), ("adversarial_verifier", "verifier"),
                ("adversarial_verifier_advmix", "verifier"), ("pairwise_adversarial", "verifier"),
                ("adversarial_verifier_advmix", "adversarial_verifier"), ("pairwise_adversarial", "pairwise")],
}
CURVE_KEYS = ("reward/mean", "reward/group_std", "adv/amplification", "adv/std", "reward/shapes_partial/strict",
              "reward/shapes_biased/strict", "reward/shapes_biased/size", "reward/pref_winrate/winrate_std",
              "reward/adversarial/mean", "disc/adversarial/acc_ref", "disc/adversarial/acc_gen",
              "disc/adversarial/reward_ref", "disc/adversarial/reward_gen")


def record_path(cond: str, seed: int, steps: int) -> Path:
    return RECORDS / f"{cond}-s{steps}-seed{seed}.json"


def run_one(cond: str, seed: int, steps: int) -> Path:
    """Train (or resume) one run and write its record; returns the record's path."""
    out = RUNS / f"{cond}-s{steps}-seed{seed}"
    every = max(40, steps // 3)  # four held-out evaluations a run (0, 1/3, 2/3, end): each costs ~1 min
    overrides = CONDITIONS[cond] + [f"model.path={BASE}", f"run.seed={seed}", f"optim.steps={steps}", f"run.output_dir={out}",
                                    "run.threads=1", f"run.eval_every={every}", f"run.save_every={every}",
                                    "run.tensorboard=false"]
    if not (out / "summary.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if any((out / "checkpoints").glob("ckpt-*")) else []
        cmd = [sys.executable, "-m", "flowgrpo", "train", "configs/demo.yaml", *overrides, *resume]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(out / "train.log", "a") as log:
            subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curves = [{k: m[k] for k in ("step", *CURVE_KEYS) if k in m} for m in metrics if any(k in m for k in CURVE_KEYS)]
    evals = [{k: v for k, v in m.items() if k == "step" or k.startswith("eval/")} for m in metrics
             if "eval/overall" in m]
    rec = {"condition": cond, "seed": seed, "steps": steps, "overrides": CONDITIONS[cond],
           "before": summary.get("before"), "after": summary.get("after"), "change": summary.get("change"),
           "wall_seconds": summary.get("wall_seconds"), "evals": evals, "curves": curves}
    path = record_path(cond, seed, steps)
    return write_record(path, rec)


def write_record(path: Path, rec: dict) -> Path:
    """Write a run's JSON record atomically (a stopped runner leaves no half record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=0))
    tmp.replace(path)
    return path


def claim(cond: str, seed: int, steps: int) -> bool:
    """Take a run for this process: a `claim` file holding our pid, created atomically. A claim
    whose process is gone (a runner that was stopped) is taken over, so the run resumes."""
    out = RUNS / f"{cond}-s{steps}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "claim"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
                return False  # another runner is training it
            except (ProcessLookupError, ValueError):
                path.unlink(missing_ok=True)
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def run(conditions: list[str], seeds: list[int], steps: int, workers: int) -> None:
    # seed-major order: a grid cut short still has every condition at the first seeds
    todo = [(c, s) for s in seeds for c in conditions if not record_path(c, s, steps).exists()]
    print(f"{len(todo)} runs to do: {todo}", flush=True)

    def job(cs):
        # several runners may share a grid (python scripts/studies.py run ... in two shells):
        # each run is claimed when it starts, so none is trained twice
        if record_path(*cs, steps).exists() or not claim(*cs, steps):
            print(f"skip {cs}: done or taken by another runner", flush=True)
            return
        p = run_one(*cs, steps)
        print(f"done {cs} -> {p.relative_to(ROOT)}", flush=True)

    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(job, todo):
            pass


# ---- report ---------------------------------------------------------------------------------
def load(conditions: list[str], steps: int) -> dict[str, list[dict]]:
    out = {}
    for c in conditions:
        recs = sorted((json.loads(p.read_text()) for p in RECORDS.glob(f"{c}-s{steps}-seed*.json")),
                      key=lambda r: r["seed"])
        if recs:
            out[c] = recs
    return out


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval across seeds (nan with one seed)."""
    from scipy.stats import t

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan")
    return float(v.mean()), float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def fmt(values, digits: int = 3) -> str:
    m, h = mean_ci(values)
    if not np.isfinite(m):
        return "—"
    return f"{m:.{digits}f}" if not np.isfinite(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def _fifth(curves: list[dict], key: str, last: bool = True) -> float:
    """Mean of `key` over the last (or first) fifth of the iterations that logged it."""
    v = [c[key] for c in curves if key in c]
    if not v:
        return float("nan")
    k = max(1, len(v) // 5)
    return float(np.mean(v[-k:] if last else v[:k]))


def _last_fifth(curves: list[dict], key: str) -> float:
    return _fifth(curves, key, last=True)


def _first_fifth(curves: list[dict], key: str) -> float:
    return _fifth(curves, key, last=False)


def _strict_key(curves: list[dict]) -> str:
    """The train samples' verifier accuracy: the monitor's, or the biased scorer's own."""
    return next((k for k in ("reward/shapes_partial/strict", "reward/shapes_biased/strict")
                 if any(k in x for x in curves)), "reward/shapes_partial/strict")


def table(data: dict[str, list[dict]], control: str = "verifier") -> str:
    stats = ("size", "saturation", "sharpness")
    ref = next(iter(data.values()))[0]["after"]["image_stats"]
    lines = ["| condition | seeds | held-out strict, after | change | vs verifier (paired by seed) | partial | "
             + " | ".join(f"{s} (renders {ref[s + '_ref']:.3g})" for s in stats)
             + " | amplification | train strict, last fifth | wall min |",
             "| --- " * (9 + len(stats)) + "|"]
    ctrl = {r["seed"]: r["after"]["overall"] for r in data.get(control, [])}
    for c, recs in data.items():
        after = [r["after"]["overall"] for r in recs]
        change = [r["change"]["overall"] for r in recs if r.get("change")]
        paired = [r["after"]["overall"] - ctrl[r["seed"]] for r in recs if r["seed"] in ctrl]
        vs = "—" if c == control or not paired else fmt(paired)
        train_strict = [_last_fifth(r["curves"], _strict_key(r["curves"])) for r in recs]
        lines.append(f"| {c} | {len(recs)} | {fmt(after)} | {fmt(change)} | {vs} | "
                     f"{fmt([r['after']['partial'] for r in recs])} | "
                     + " | ".join(fmt([r["after"]["image_stats"][s] for r in recs], 3 if s != "sharpness" else 1)
                                  for s in stats)
                     + f" | {fmt([_amplification(r) for r in recs], 1)}"
                     f" | {fmt(train_strict)} | {fmt([r['wall_seconds'] / 60 for r in recs], 1)} |")
    base = [r["before"] for recs in data.values() for r in recs if r.get("before")]
    if base:
        lines.append(f"\nbase model (before, each run's own seed): strict {fmt([b['overall'] for b in base])}, "
                     + ", ".join(f"{s} {fmt([b['image_stats'][s] for b in base], 3)}" for s in stats))
    return "\n".join(lines)


def _amplification(r: dict) -> float:
    """Mean advantage std over within-group reward std; undefined under the advantage mix, where
    the summed reward is never normalised (the trainer logs it per reward there)."""
    if "reward.mix=advantage" in r.get("overrides", CONDITIONS.get(r["condition"], [])):
        return float("nan")
    return float(np.nanmean([x.get("adv/amplification", np.nan) for x in r["curves"]]))


def _outcomes(r: dict) -> dict[str, float]:
    return {"held-out strict": r["after"]["overall"], "partial": r["after"]["partial"],
            **{k: r["after"]["image_stats"][k] for k in ("size", "saturation", "sharpness")},
            "amplification": _amplification(r)}


def _paired_cell(diffs: list[float], digits: int = 3) -> str:
    """Mean ± 95% interval of paired differences, marked shown when the interval excludes 0."""
    m, h = mean_ci(diffs)
    return fmt(diffs, digits) + (" **shown**" if np.isfinite(h) and abs(m) > h else "")


def contrast_table(data: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> str:
    """a - b per seed (the same seed: same prompts, noise and evaluation images), mean ± 95%."""
    keys = ("held-out strict", "partial", "size", "saturation", "sharpness", "amplification")
    lines = ["| a - b (paired by seed) | seeds | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 2) + "|"]
    for a, b in pairs:
        if a not in data or b not in data:
            continue
        by_seed = {r["seed"]: _outcomes(r) for r in data[b]}
        diffs = [(_outcomes(r), by_seed[r["seed"]]) for r in data[a] if r["seed"] in by_seed]
        cells = [_paired_cell([x[k] - y[k] for x, y in diffs], 1 if k in ("sharpness", "amplification") else 3)
                 for k in keys]
        lines.append(f"| {a} - {b} | {len(diffs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trajectory_table(data: dict[str, list[dict]], pairs: list[tuple[str, str]],
                     keys=("eval/overall", "eval/image/size")) -> str:
    """The paired differences at every held-out evaluation, not only the last: whether a gap
    opens, holds or closes with the budget."""
    steps = [e["step"] for e in next(iter(data.values()))[0]["evals"][1:]]
    lines = ["| a - b (paired by seed) | outcome | " + " | ".join(f"it {st}" for st in steps) + " |"]
    lines.append("| --- " * (len(lines[0].split("|")) - 2) + "|")
    for a, b in pairs:
        if a not in data or b not in data:
            continue
        ev_a, ev_b = ({r["seed"]: {e["step"]: e for e in r["evals"]} for r in data[c]} for c in (a, b))
        for k in keys:
            cells = [_paired_cell([ev_a[s][step][k] - ev_b[s][step][k] for s in ev_a
                                   if s in ev_b and step in ev_a[s] and step in ev_b[s]]) for step in steps]
            lines.append(f"| {a} - {b} | {k.removeprefix('eval/')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adversarial_table(data: dict[str, list[dict]]) -> str:
    lines = ["| condition | adversarial reward, first -> last fifth | discriminator accuracy on each new batch, "
             "first -> last fifth | reference - sample reward gap, last fifth |", "| --- | --- | --- | --- |"]
    for c, recs in data.items():
        if not any("disc/adversarial/acc_ref" in x for x in recs[0]["curves"]):
            continue

        def acc(cur, fn):
            return (fn(cur, "disc/adversarial/acc_ref") + fn(cur, "disc/adversarial/acc_gen")) / 2

        lines.append(
            f"| {c} | {fmt([_first_fifth(r['curves'], 'reward/adversarial/mean') for r in recs])} -> "
            f"{fmt([_last_fifth(r['curves'], 'reward/adversarial/mean') for r in recs])} | "
            f"{fmt([acc(r['curves'], _first_fifth) for r in recs], 2)} -> "
            f"{fmt([acc(r['curves'], _last_fifth) for r in recs], 2)} | "
            f"{fmt([_last_fifth(r['curves'], 'disc/adversarial/reward_ref') - _last_fifth(r['curves'], 'disc/adversarial/reward_gen') for r in recs])} |")
    return "\n".join(lines)


def _smooth(steps: list, values: list, window: int = 10) -> tuple[list, np.ndarray]:
    """A trailing moving average over `window` iterations (per-iteration rewards are noisy)."""
    if len(values) < window:
        return steps, np.asarray(values)
    return steps[window - 1:], np.convolve(values, np.ones(window) / window, "valid")


def figure(name: str, data: dict[str, list[dict]], steps: int = 120) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 5, figsize=(21, 3.6))
    colours = {c: f"C{i % 10}" for i, c in enumerate(data)}
    for c, recs in data.items():
        for i, r in enumerate(recs):
            ev, cur = r["evals"], r["curves"]
            ax[0].plot([e["step"] for e in ev], [e["eval/overall"] for e in ev], color=colours[c], alpha=.7,
                       label=c if i == 0 else None)
            for a, stat in ((ax[1], "size"), (ax[2], "sharpness")):
                a.plot([e["step"] for e in ev], [e[f"eval/image/{stat}"] for e in ev], color=colours[c], alpha=.7)
            key = _strict_key(cur)
            for a, k in ((ax[3], key), (ax[4], "reward/mean")):
                if any(k in x for x in cur):
                    a.plot(*_smooth([x["step"] for x in cur if k in x], [x[k] for x in cur if k in x]),
                           color=colours[c], alpha=.6)
    first = next(iter(data.values()))[0]["after"]["image_stats"]
    for a, stat in ((ax[1], "size"), (ax[2], "sharpness")):
        a.axhline(first[f"{stat}_ref"], color="k", ls=":", label="renders")
        a.legend(fontsize=7)
    titles = ("held-out strict (20-step ODE, CFG-free)", "held-out object size", "held-out edge sharpness",
              "train samples: verifier strict (10-it mean)", "train reward, what is optimised (10-it mean)")
    for a, t in zip(ax, titles):
        a.set_title(t, fontsize=9)
        a.set_xlabel("iteration")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    out = ROOT / "docs" / "figures" / f"study_{name}{'' if steps == 120 else f'_s{steps}'}.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def report(names: list[str], steps: int) -> None:
    for name in names:
        data = load(STUDIES[name], steps)
        if not data:
            print(f"## {name}: no finished runs\n")
            continue
        print(f"## {name} ({steps} iterations)\n\n{table(data)}\n")
        print(contrast_table(data, CONTRASTS.get(name, [])) + "\n")
        print(trajectory_table(data, CONTRASTS.get(name, [])[:1]) + "\n")
        if name != "hacking":  # the discriminator's own numbers
            print(adversarial_table(data) + "\n")
        print(f"figure: {figure(name, data, steps).relative_to(ROOT)}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "report"])
    ap.add_argument("study", nargs="+", choices=[*STUDIES, "all", *CONDITIONS],
                    help="studies or single conditions; several are run as one grid")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    names = list(STUDIES) if "all" in args.study else [n for n in args.study if n in STUDIES]
    conds = list(dict.fromkeys([c for n in names for c in STUDIES[n]] + [c for c in args.study if c in CONDITIONS]))
    if args.action == "run":
        run(conds, args.seeds, args.steps, args.workers)
    else:
        report(names or [n for n in STUDIES if set(conds) & set(STUDIES[n])], args.steps)

if __name__ == "__main__":
    main()

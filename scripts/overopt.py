"""Over-optimisation of a learned proxy reward on the shapes world (docs/results/over-optimisation.md).

Every condition trains on the proxy (`flowgrpo make-proxy`: a small CNN imitating the verifier,
pair accuracy about 0.8 on held-out images) and scores the verifier's partial credit on the same
rollouts as gold (`reward.gold`), which never enters training; `monitor.base_kl_images` logs the
distance from the base at each gold scoring. The demo's base and tags (colors, counting), the
demo's NFT objective unless a condition says otherwise:

    pointwise     the proxy's score, no anchor (nft_kl_weight 0): the run that should over-optimise
    pairwise      win rates under the proxy as a judge (Pref-GRPO), no anchor
    kl_0.3, kl_1  the proxy's score with the anchor at 0.3 and at 1.0 (the demo's)
    adversarial   the proxy's score plus a discriminator on frozen features (Adv-GRPO), no anchor
    ratio         the proxy's score under Flow-GRPO-Fast's ratio objective (configs/shapes_fast.yaml)

    python scripts/overopt.py proxy                       # runs/shapes-proxy, about 4 minutes
    python scripts/overopt.py run --seeds 0 1 2 --workers 2
    python scripts/overopt.py run pointwise --seeds 0     # one condition, one seed
    python scripts/overopt.py report                      # Markdown on stdout, docs/figures/overopt.png

`run` trains the missing (condition, seed) runs, --workers at a time with one thread each, resumes
an interrupted run from its checkpoint and writes one JSON record per finished run to
docs/overopt/ (committed), which `report` reads.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studies import mean_ci, write_record  # noqa: E402  (the other studies' intervals and records)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "overopt"
RUNS = ROOT / "runs" / "overopt"
PROXY = "runs/shapes-proxy"
STEPS = 300
FALL = 0.05  # gold counts as fallen when its smoothed curve is this far below its running peak
SMOOTH = 20  # iterations in the moving average of the gold and proxy curves
STOP_AFTER = (1, 5)  # monitor.stop_after values whose stopping iteration the alarm table shows
SUSTAINED = (5, 10)  # an alarm is sustained once alarms fired on 5 of the last 10 iterations (a blip is not)
PROXY_REWARD = ["reward.weights={shapes_proxy: 1.0}", f"reward.args={{shapes_proxy: {{path: {PROXY}}}}}"]
GOLD = ["reward.gold={shapes_partial: 1.0}", "run.gold_every=1", "monitor.base_kl_images=8"]
NO_ANCHOR = ["optim.nft_kl_weight=0.0"]
CONDITIONS = {  # name -> (config, overrides after GOLD's)
    "pointwise": ("configs/demo.yaml", PROXY_REWARD + NO_ANCHOR),
    "pairwise": ("configs/demo.yaml", ["reward.weights={pref_winrate: 1.0}",
                                       f"reward.args={{pref_winrate: {{judge: shapes_proxy, judge_args: {{path: {PROXY}}}}}}}",
                                       # a win rate's mean is 0.5 by construction: the proxy's own score is
                                       # logged beside gold (weight 0 keeps it out of gold/total)
                                       "reward.gold={shapes_partial: 1.0, shapes_proxy: 0.0}",
                                       f"reward.gold_args={{shapes_proxy: {{path: {PROXY}}}}}",
                                       "monitor.proxy_key=gold/shapes_proxy"]
                 + NO_ANCHOR),
    "kl_0.3": ("configs/demo.yaml", PROXY_REWARD + ["optim.nft_kl_weight=0.3"]),
    "kl_1": ("configs/demo.yaml", PROXY_REWARD + ["optim.nft_kl_weight=1.0"]),
    "adversarial": ("configs/demo.yaml", ["reward.weights={shapes_proxy: 1.0, adversarial: 1.0}",
                                          f"reward.args={{shapes_proxy: {{path: {PROXY}}}, adversarial: "
                                          "{backbone: assets/shapes-dinov2, references: shapes, lr: 0.001}}"]
                    + NO_ANCHOR),
    "ratio": ("configs/shapes_fast.yaml", PROXY_REWARD + ["model.path=assets/shapes-sd3-cells-alt"]),
}


def record_path(cond: str, seed: int, steps: int) -> Path:
    return RECORDS / f"{cond}-s{steps}-seed{seed}.json"


def run_one(cond: str, seed: int, steps: int) -> Path:
    """Train (or resume) one run, write its record; returns the record's path."""
    config, extra = CONDITIONS[cond]
    out = RUNS / f"{cond}-s{steps}-seed{seed}"
    overrides = GOLD + extra + [f"run.seed={seed}", f"optim.steps={steps}", f"run.output_dir={out.relative_to(ROOT)}",
                                "run.threads=1", f"run.eval_every={steps // 3}", "run.save_every=50",
                                "run.tensorboard=false", "run.eval_images_per_prompt=16"]
    if not (out / "summary.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if any((out / "checkpoints").glob("ckpt-*")) else []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        with open(out / "train.log", "a") as log:
            subprocess.run([sys.executable, "-m", "flowgrpo", "train", config, *overrides, *resume], cwd=ROOT,
                           env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    rec = make_record(cond, seed, steps, config, overrides, out)
    path = record_path(cond, seed, steps)
    return write_record(path, rec)


def proxy_score(row: dict) -> float:
    """The proxy's mean score on an iteration's rollouts: its own component where it is mixed with
    another reward (adversarial), its gold-side score where the trained reward is a win rate under it
    (pairwise: mean 0.5 by construction), else the trained reward."""
    for key in ("reward/shapes_proxy/mean", "gold/shapes_proxy"):
        if key in row:
            return row[key]
    return row.get("reward/mean") if "reward/pref_winrate/mean" not in row else None


def make_record(cond, seed, steps, config, overrides, out: Path) -> dict:
    rows: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            rows.setdefault(int(m["step"]), {}).update(m)  # a resumed run logs its last iterations again
    curves = {"step": [], "proxy": [], "gold": [], "base_kl": [], "alarms": []}
    evals = []
    for step, r in sorted(rows.items()):
        if "gold/total" in r:
            curves["step"].append(step)
            curves["proxy"].append(proxy_score(r))
            curves["gold"].append(r["gold/total"])
            curves["base_kl"].append(r.get("monitor/base_kl"))
            curves["alarms"].append(sorted(k.removeprefix("alarm/") for k, v in r.items()
                                           if k.startswith("alarm/") and v))
        if "eval/overall" in r:
            evals.append({"step": step, "overall": r["eval/overall"]})
    summary = json.loads((out / "summary.json").read_text())
    return {"condition": cond, "seed": seed, "steps": steps, "config": config, "overrides": overrides,
            "wall_seconds": summary.get("wall_seconds"), "curves": curves, "evals": evals}


def run(conditions: list[str], seeds: list[int], steps: int, workers: int) -> None:
    if not (ROOT / PROXY / "proxy.safetensors").exists():
        sys.exit(f"no proxy at {PROXY}: run `python scripts/overopt.py proxy` first")
    todo = [(c, s) for s in seeds for c in conditions if not record_path(c, s, steps).exists()]
    print(f"{len(todo)} runs to do: {todo}", flush=True)
    with ThreadPoolExecutor(workers) as pool:
        for path in pool.map(lambda cs: run_one(*cs, steps), todo):
            print(f"done -> {path.relative_to(ROOT)}", flush=True)


# ---- analysis ---------------------------------------------------------------------------------
def smooth(values, window: int = SMOOTH) -> np.ndarray:
    """Trailing moving average (the first points average what there is)."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    n = np.minimum(np.arange(1, len(v) + 1), window)
    return (c[1:] - c[np.arange(1, len(v) + 1) - n]) / n


def gold_drop_step(rec: dict) -> int | None:
    """Where the gold_drop alarm (monitor defaults) fires on the record's curves, recomputed so that
    runs logged before it existed count alike; None if it never does or the proxy was not logged."""
    from types import SimpleNamespace

    from flowgrpo.config import load_config
    from flowgrpo.monitors import HackingMonitor
    from flowgrpo.train_config import TrainConfig

    c = rec["curves"]
    if None in c["proxy"]:
        return None
    mon = HackingMonitor(load_config(TrainConfig, None, []), SimpleNamespace(num_processes=1))
    for s, p, g in zip(c["step"], c["proxy"], c["gold"]):
        mon.proxy.append(p), mon.gold_total.append(g)
        if mon._gold_drop({"gold/total": g}):
            return int(s)
    return None


def outcome(rec: dict, fall: float = FALL) -> dict:
    """Peak of the smoothed gold curve, its end, the drop, and where it first fell `fall` below its
    running peak; the proxy's rise; the first iteration with an alarm (after the base iterations)."""
    c = rec["curves"]
    full = slice(min(SMOOTH, len(c["gold"])) - 1, None)  # whole windows only: one early point is no peak
    steps, gold = np.asarray(c["step"])[full], smooth(c["gold"])[full]
    proxy = smooth(c["proxy"])[full] if None not in c["proxy"] else None  # a pairwise run logged without it
    peak = int(np.argmax(gold))
    fell = np.flatnonzero(gold < np.maximum.accumulate(gold) - fall)
    # the warnings: every alarm but gold_drop, which watches gold itself (reported apart)
    warnings = [[x for x in a if x != "gold_drop"] for a in c["alarms"]]
    alarm = next((int(s) for s, a in zip(c["step"], warnings) if a), None)
    hits, window = SUSTAINED
    on = np.array([bool(a) for a in warnings], dtype=float)
    recent = np.convolve(on, np.ones(window))[: len(on)]  # alarming iterations among the last `window`
    sustained = next((int(s) for s, k in zip(c["step"], recent) if k >= hits), None)
    streak, stops = 0, {}  # where run.stop_on_alarm would end the run, for monitor.stop_after 1 and 5
    for s, a in zip(c["step"], warnings):
        streak = streak + 1 if a else 0
        for k in STOP_AFTER:
            if streak >= k:
                stops.setdefault(k, int(s))
    alarm_names = sorted({name for a in warnings for name in a})
    kl = [k for k in c["base_kl"] if k is not None]
    return {"gold_start": float(gold[0]), "gold_peak": float(gold[peak]),
            "gold_peak_step": int(steps[peak]), "gold_end": float(gold[-1]), "drop": float(gold[peak] - gold[-1]),
            "proxy_rise": float(proxy[-1] - proxy[0]) if proxy is not None else None,
            "fell_step": int(steps[fell[0]]) if len(fell) else None, "alarm_step": alarm, "alarms": alarm_names,
            "sustained_step": sustained, "alarm_iterations": int(on.sum()), "stops": stops,
            "gold_drop_step": gold_drop_step(rec),
            "base_kl_end": float(np.mean(kl[-SMOOTH:])) if kl else None,
            "held_out": (rec["evals"][0]["overall"], rec["evals"][-1]["overall"]) if rec["evals"] else None}


def cell(values, digits: int = 3) -> str:
    m, h = mean_ci(values)
    if not np.isfinite(m):
        return "-"
    return f"{m:.{digits}f}" if not np.isfinite(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def load(steps: int) -> dict[str, list[dict]]:
    data: dict[str, list[dict]] = {}
    for p in sorted(RECORDS.glob(f"*-s{steps}-seed*.json")):
        rec = json.loads(p.read_text())
        data.setdefault(rec["condition"], []).append(rec)
    return {c: data[c] for c in CONDITIONS if c in data}


def table(data: dict[str, list[dict]]) -> str:
    head = ("| condition | seeds | gold at start | gold peak (iteration) | gold at end | peak - end | proxy rise "
            "| distance from base at end | held-out before -> after |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for cond, recs in data.items():
        o = [outcome(r) for r in recs]
        held = [x["held_out"] for x in o if x["held_out"]]
        lines.append(
            f"| {cond} | {len(recs)} | {cell([x['gold_start'] for x in o])} | {cell([x['gold_peak'] for x in o])} "
            f"({cell([x['gold_peak_step'] for x in o], 0)}) | {cell([x['gold_end'] for x in o])} "
            f"| {cell([x['drop'] for x in o])} | {cell([x['proxy_rise'] for x in o])} "
            f"| {cell([x['base_kl_end'] for x in o], 4)} "
            f"| {cell([h[0] for h in held])} -> {cell([h[1] for h in held])} |")
    return "\n".join(lines)


def lead(o: dict) -> int | None:
    """Iterations from the first sustained alarm to gold's fall (None unless both happened, in that order)."""
    if o["fell_step"] is None or o["sustained_step"] is None or o["sustained_step"] > o["fell_step"]:
        return None
    return o["fell_step"] - o["sustained_step"]


def alarm_table(data: dict[str, list[dict]], fall: float = FALL) -> str:
    """Per run: when gold first fell `fall` below its running peak, the first alarm, the first
    sustained one, its lead over the fall, and how many iterations alarmed at all."""
    hits, window = SUSTAINED
    lines = [f"| condition | seed | gold fell 0.05 at | first alarm at | first sustained alarm ({hits} of {window}) at "
             "| lead (iterations) | iterations alarming | stop_on_alarm stops at (stop_after 1, 5) | alarms "
             "| gold_drop at |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def at(step):
        return "none" if step is None else step

    for cond, recs in data.items():
        for r in recs:
            o = outcome(r, fall)
            ahead = lead(o)
            lines.append(f"| {cond} | {r['seed']} | {'never' if o['fell_step'] is None else o['fell_step']} "
                         f"| {at(o['alarm_step'])} | {at(o['sustained_step'])} | {'-' if ahead is None else ahead} "
                         f"| {o['alarm_iterations']} of {len(r['curves']['step'])} "
                         f"| {', '.join(str(at(o['stops'].get(k))) for k in STOP_AFTER)} | {', '.join(o['alarms']) or '-'} "
                         f"| {at(o['gold_drop_step'])} |")
    return "\n".join(lines)


def alarm_summary(data: dict[str, list[dict]], fall: float = FALL) -> str:
    """The alarms' record per condition. A run is hacked when its gold ends `fall` or more below its
    peak (a dip that recovers is not); of the hacked runs, how many had a sustained alarm before
    smoothed gold first fell `fall` below its running peak (and by how many iterations, median); of
    the others, how many had a sustained alarm anyway (false alarms) or alarmed at all."""
    lines = ["| condition | runs | hacked (gold ends 0.05+ below its peak) | warned before the fall "
             "| median lead (iterations) | missed or late | any alarm before the fall | not hacked "
             "| false alarms (sustained) | not hacked, any alarm | gold_drop: hacked runs caught, false alarms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cond, recs in data.items():
        o = [outcome(r, fall) for r in recs]
        hacked = [x for x in o if x["drop"] >= fall]
        leads = [lead(x) for x in hacked if lead(x) is not None]
        clean = [x for x in o if x["drop"] < fall]
        false = sum(x["sustained_step"] is not None for x in clean)
        blips = sum(x["alarm_step"] is not None for x in clean)
        early = sum(x["alarm_step"] is not None and x["alarm_step"] <= x["fell_step"] for x in hacked)
        lines.append(f"| {cond} | {len(o)} | {len(hacked)} | {len(leads)} | {f'{np.median(leads):.0f}' if leads else '-'} "
                     f"| {len(hacked) - len(leads)} | {early} | {len(clean)} | {false} | {blips} "
                     f"| {sum(x['gold_drop_step'] is not None for x in hacked)}, "
                     f"{sum(x['gold_drop_step'] is not None for x in clean)} |")
    return "\n".join(lines)


def diff_ci(a, b) -> tuple[float, float]:
    """mean(a) - mean(b) and the half-width of its 95% Welch interval (nan unless both have two values)."""
    from scipy.stats import t

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    if len(a) < 2 or len(b) < 2:
        return d, float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return d, 0.0
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return d, float(t.ppf(0.975, dof) * np.sqrt(va + vb))


def verdict(d: float, h: float) -> str:
    if not np.isfinite(d):
        return "-"
    if not np.isfinite(h):
        return "fewer than 2 seeds a side"
    return "higher" if d - h > 0 else "lower" if d + h < 0 else "not resolved"


def protection_table(data: dict[str, list[dict]], against: str = "pointwise") -> str:
    """Does each condition hold gold higher than the unprotected pointwise proxy? Gold at the end,
    gold's peak and held-out accuracy at the end, each as a difference with its Welch interval."""
    if against not in data:
        return f"(no {against} runs to compare with)"
    base = [outcome(r) for r in data[against]]
    lines = [f"| condition | seeds | gold at end vs {against} | verdict | gold peak vs {against} "
             f"| held-out at end vs {against} | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]

    def signed(d: float, h: float) -> str:
        if not np.isfinite(d):
            return "-"
        return f"{d:+.3f}" if not np.isfinite(h) else f"{d:+.3f} ({d - h:+.3f} .. {d + h:+.3f})"

    for cond, recs in data.items():
        if cond == against:
            continue
        o = [outcome(r) for r in recs]
        end = diff_ci([x["gold_end"] for x in o], [x["gold_end"] for x in base])
        peak = diff_ci([x["gold_peak"] for x in o], [x["gold_peak"] for x in base])
        held = diff_ci([x["held_out"][1] for x in o if x["held_out"]], [x["held_out"][1] for x in base if x["held_out"]])
        lines.append(f"| {cond} | {len(recs)} | {signed(*end)} | {verdict(*end)} | {signed(*peak)} "
                     f"| {signed(*held)} | {verdict(*held)} |")
    return "\n".join(lines)


def figure(data: dict[str, list[dict]], path: Path, against: str = "pointwise") -> Path:
    """One row per condition: gold (solid) and the proxy (dashed) against iterations, and gold
    against the distance from the base; every seed a line, the unprotected runs in grey behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(data), 2, figsize=(12, 2.8 * len(data)), squeeze=False, sharex="col", sharey="row")
    for row, (cond, recs) in zip(axes, data.items()):
        layers = [(data.get(against, []), "0.75", None)] if cond != against else []
        for recs_, color, label in layers + [(recs, None, cond)]:
            for j, r in enumerate(recs_):
                c = r["curves"]
                tint = color or f"C{j}"
                name = f"{label} seed {r['seed']}" if label else (against if j == 0 else None)
                row[0].plot(c["step"], smooth(c["gold"]), color=tint, lw=1.2, label=name)
                if label and None not in c["proxy"]:
                    row[0].plot(c["step"], smooth(c["proxy"]), color=tint, lw=1.0, ls="--")
                if all(k is not None for k in c["base_kl"]):  # both smoothed: 8 images' distance is noisy
                    row[1].plot(smooth(c["base_kl"]), smooth(c["gold"]), color=tint, lw=1.0)
        row[0].set(ylabel=f"{cond}\nscore ({SMOOTH}-it. mean)")
        row[0].legend(fontsize=7, loc="lower left")
        row[1].set(xscale="log")
        for a in row:
            a.grid(alpha=0.3)
    axes[0, 0].set_title("gold: verifier partial credit (solid); proxy's own score (dashed)")
    axes[0, 1].set_title("gold against the distance from the base")
    axes[-1, 0].set(xlabel="iteration")
    axes[-1, 1].set(xlabel=f"mean (v - v_base)^2 ({SMOOTH}-iteration mean)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("proxy", help=f"train the proxy into {PROXY} (flowgrpo make-proxy, defaults)")
    r = sub.add_parser("run", help="train the missing runs")
    r.add_argument("conditions", nargs="*", help=f"some of {', '.join(CONDITIONS)} (default: all)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--steps", type=int, default=STEPS)
    r.add_argument("--workers", type=int, default=2)
    rep = sub.add_parser("report", help="tables on stdout and the figure")
    rep.add_argument("--steps", type=int, default=STEPS)
    rep.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "overopt.png")
    args = p.parse_args(argv)
    if args.cmd == "proxy":
        subprocess.run([sys.executable, "-m", "flowgrpo", "make-proxy", "--out", PROXY], cwd=ROOT, check=True)
    elif args.cmd == "run":
        unknown = [c for c in args.conditions if c not in CONDITIONS]
        if unknown:
            sys.exit(f"unknown conditions {unknown}: choose from {', '.join(CONDITIONS)}")
        run(args.conditions or list(CONDITIONS), args.seeds, args.steps, args.workers)
    else:
        data = load(args.steps)
        if not data:
            sys.exit(f"no records in {RECORDS.relative_to(ROOT)} for {args.steps} iterations: run first")
        print(table(data), protection_table(data), alarm_summary(data), alarm_table(data), sep="\n\n")
        print(f"\nfigure: {figure(data, args.figure).relative_to(ROOT)}")


if __name__ == "__main__":
    main()

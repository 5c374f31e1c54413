"""The race: how fast each objective lifts held-out accuracy on the shapes world's demo task
(docs/results/race.md).

Every run is `configs/demo.yaml` (its base, LoRA, tags, reward, 64 images an iteration, held-out
prompts and 20-step evaluation) with one objective's overrides, trained on one CPU thread until
its iterations have used --budget-cpu-minutes of process CPU time (run.max_cpu_minutes; the
held-out evaluations, every --eval-every-cpu-minutes, are not counted). Two stages:

  search   every setting of each objective's grid (OBJECTIVES), seed --search-seed, for
           --search-budget-cpu-minutes; the setting with the highest mean held-out accuracy over
           that budget (the area under its curve) is the objective's best
  finals   the best setting with --seeds (fresh seeds: the search seed picked the winner and would
           flatter it), for --budget-cpu-minutes

    python scripts/race.py measure                     # CPU s an iteration and an evaluation (minutes)
    python scripts/race.py plan                        # the runs and their cost; trains nothing
    python scripts/race.py run --workers 16            # both stages; finished runs are reused
    python scripts/race.py run --objectives nft_demo flow_grpo --workers 4
    python scripts/race.py report                      # Markdown (stdout) and docs/figures/race.png

`run` trains --workers runs at a time (one thread each, on the CPU: the axis is CPU time), resumes
a run interrupted mid-way from its checkpoint, and writes one JSON record per finished run to
docs/race/ (committed): `report` needs only those. One runner at a time per --runs folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studies import mean_ci, write_record  # noqa: E402  (the other studies' intervals and records)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
RECORDS = ROOT / "docs" / "race"
RUNS = ROOT / "runs" / "race"
TARGET = 0.10  # held-out gain over the base the race times
MARKS = (10.0, 60.0)  # CPU-minutes at which accuracy is compared
ITERATION_CAP = 100_000  # optim.steps: the CPU budget ends every run long before
SAVE_EVERY = 20  # iterations between checkpoints (a resumed run repeats at most these)
RIVAL = "flow_grpo"  # the speed-ups are against it


@dataclass(frozen=True)
class Objective:
    label: str
    overrides: tuple[str, ...]  # on top of CONFIG, for every setting
    grid: dict  # setting name -> its overrides
    why: str  # what the grid varies and why


LRS_RATIO = {"lr1e-4": ("optim.lr=1e-4",), "lr2e-4": ("optim.lr=2e-4",), "lr5e-4": ("optim.lr=5e-4",)}
LRS_OFFICIAL = {"lr1e-4": ("optim.lr=1e-4",), "lr3e-4": ("optim.lr=3e-4",), "lr1e-3": ("optim.lr=1e-3",)}
# the demo config's forward-objective draws, reset where an objective uses the sampler's own levels
PLAIN_LEVELS = ("optim.fm_sigma_range=null", "optim.fm_timesteps=rollout")
OBJECTIVES = {
    # Flow-GRPO (SD3.5 GenEval recipe's values): SDE rollouts, all but the last step trained, KL 0.04
    "flow_grpo": Objective(
        "Flow-GRPO (ratio, flow_sde)",
        ("optim.policy_loss=ratio", "sample.kind=flow_sde", "sample.noise_level=0.7", "optim.kl_beta=0.04",
         "optim.timestep_fraction=0.99", *PLAIN_LEVELS),
        LRS_RATIO, "lr: one optimizer step an iteration keeps the ratio at 1, so the clip never binds; "
                   "lr 1e-3 broke the shapes model in a single-prompt probe (docs/flow-grpo.md)"),
    # Flow-GRPO-Fast as configs/shapes_fast.yaml (and the CFG-free SD3.5 recipe): a 3-step SDE window
    "flow_grpo_fast": Objective(
        "Flow-GRPO-Fast (SDE window)",
        ("optim.policy_loss=ratio", "sample.kind=flow_sde", "sample.noise_level=0.8", "sample.window_size=3",
         "sample.window_start_range=[0,2]", "optim.timestep_fraction=1.0", *PLAIN_LEVELS),
        LRS_RATIO, "lr, as Flow-GRPO"),
    # MixGRPO: 4 of 25 steps scaled to 2 of 8; start range [0, 19] of 25 to [0, 5] of 8; 25 iterations a position
    "mixgrpo": Objective(
        "MixGRPO (progressive window)",
        ("optim.policy_loss=ratio", "sample.kind=flow_sde", "sample.noise_level=0.7", "sample.window_size=2",
         "sample.window_start_range=[0,5]", "sample.window_schedule=progressive", "sample.window_every=25",
         "sample.window_stride=1", "optim.timestep_fraction=1.0", "optim.drop_zero_signal=false", *PLAIN_LEVELS),
        LRS_RATIO, "lr, as Flow-GRPO"),
    # MixGRPO-Flash: the same window, 20 iterations a position, DPM-Solver++(2M) on 0.4 of the later steps
    "mixgrpo_flash": Objective(
        "MixGRPO-Flash",
        ("optim.policy_loss=ratio", "sample.kind=flow_sde", "sample.noise_level=0.7", "sample.window_size=2",
         "sample.window_start_range=[0,5]", "sample.window_schedule=progressive", "sample.window_every=20",
         "sample.window_stride=1", "sample.window_after=dpm2", "sample.window_compress=0.4",
         "optim.timestep_fraction=1.0", "optim.drop_zero_signal=false", *PLAIN_LEVELS),
        {"lr2e-4": ("optim.lr=2e-4",), "lr5e-4": ("optim.lr=5e-4",)}, "lr, the upper two of MixGRPO's"),
    # AWM on 8-step ODE rollouts; it draws its own logit-normal levels (optim.awm_timesteps)
    "awm": Objective(
        "AWM",
        ("optim.policy_loss=awm", "sample.kind=ode", "sample.noise_level=0.0", "optim.lr=3e-4", *PLAIN_LEVELS),
        {"kl0": ("optim.kl_beta=0.0",), "kl0.1": ("optim.kl_beta=0.1",), "kl1": ("optim.kl_beta=1.0",)},
        "the anchor kl_beta: without one AWM drifted down on the shapes model, with 1.0 it stayed flat "
        "(docs/results/objectives.md)"),
    # DiffusionNFT at the official values (configs/recipes/sd35m_nft_geneval.yaml), sized to the shapes
    # model: 10-step dpm2 rollouts, global-std advantages, flat groups kept, a random 9 of 10 steps per
    # image, beta 1, decay type 1, KL 1e-4, EMA 0.9 for evaluation, gaussian LoRA init. Kept from the
    # demo: 8 prompts x 8 images (not 48 x 24: the same images an iteration for every objective) and
    # the LoRA targets (attention alone leaves a tiny model little capacity)
    "nft_official": Objective(
        "NFT, official settings",
        ("optim.policy_loss=nft", "sample.kind=dpm2", "sample.num_steps=10", "model.lora.init=gaussian",
         "optim.adv_std=global", "optim.adv_eps=1e-4", "optim.adv_std_ddof=0", "optim.drop_zero_signal=false",
         "optim.fm_timesteps=rollout", "optim.fm_sigma_range=null", "optim.timestep_mode=random",
         "optim.timestep_subset=per_sample", "optim.timestep_fraction=0.99", "optim.nft_beta=1.0",
         "optim.nft_decay_type=1", "optim.nft_kl_weight=1e-4", "optim.ema_decay=0.9", "optim.ema_every=1",
         "optim.ema_warmup=true"),
        LRS_OFFICIAL, "lr around the official 3e-4"),
    # DiffusionNFT as make demo trains it: configs/demo.yaml unchanged
    "nft_demo": Objective(
        "NFT, the demo's settings", (),
        {"lr5e-4": ("optim.lr=5e-4",), "lr1e-3": ("optim.lr=1e-3",), "lr2e-3": ("optim.lr=2e-3",)},
        "lr around the demo's 1e-3"),
    # DGPO at the official GenEval values (configs/recipes/sd35m_dgpo_geneval.yaml), CFG-free like every
    # run here (the base draws cleanly without it): the reference is the base at guidance 1
    "dgpo": Objective(
        "DGPO",
        ("optim.policy_loss=dgpo", "sample.kind=dpm2", "sample.num_steps=10", "model.lora.init=gaussian",
         "optim.train_guidance=1.0", "optim.dgpo_ref_guidance=1.0", "optim.dgpo_beta=100.0", "optim.dgpo_clip=true",
         "optim.clip_range=0.01", "optim.kl_beta=0.02", "optim.dgpo_ref=base", "optim.dgpo_sample_old_after=500",
         "optim.adv_std=group", "optim.adv_eps=1e-4", "optim.drop_zero_signal=false", "optim.fm_timesteps=rollout",
         "optim.fm_sigma_range=null", "optim.fm_rollout_steps=5", "optim.timestep_mode=random",
         "optim.timestep_count=4", "optim.fm_group_noise=true", "optim.ema_decay=0.9", "optim.ema_every=8",
         "optim.ema_warmup=true"),
        LRS_OFFICIAL, "lr around the official 3e-4"),
    # reward-filtered flow matching on the images above their group's mean, anchored, the demo's levels
    "reward_filtered": Objective(
        "reward-filtered (anchored)",
        ("optim.policy_loss=reward_filtered", "optim.rf_select=above_mean"),
        {"kl1": ("optim.kl_beta=1.0",), "kl3": ("optim.kl_beta=3.0",)},
        "the anchor kl_beta: fitting own samples drifts, an anchor slows it (docs/results/objectives.md)"),
}
PAPER_CLAIMS = {  # what each paper reports against its baseline, for the results page
    "nft_official": "up to 25x over Flow-GRPO (GenEval 0.24 -> 0.98 within 1k steps)",
    "nft_demo": "up to 25x over Flow-GRPO",
    "awm": "up to 24x over Flow-GRPO",
    "dgpo": "about 20-30x over Flow-GRPO",
    "mixgrpo": "about 50% less training time than DanceGRPO",
    "mixgrpo_flash": "faster than MixGRPO (fewer sampler steps after the window)",
}


@dataclass(frozen=True)
class Run:
    objective: str
    setting: str
    seed: int
    budget: float  # CPU-minutes

    @property
    def name(self) -> str:
        return f"{self.objective}-{self.setting}-b{self.budget:g}-seed{self.seed}"

    def overrides(self, eval_every: float, extra: list[str]) -> list[str]:
        o = OBJECTIVES[self.objective]
        return [*o.overrides, *o.grid[self.setting], f"run.seed={self.seed}", f"run.output_dir={run_dir(self)}",
                "run.threads=1", "run.tensorboard=false", "run.eval_every=0", "run.grid_every=0",
                f"run.save_every={SAVE_EVERY}", f"optim.steps={ITERATION_CAP}", f"run.max_cpu_minutes={self.budget:g}",
                f"run.eval_every_cpu_minutes={eval_every:g}", *extra]


def record_path(run: Run) -> Path:
    return RECORDS / f"{run.name}.json"


def run_dir(run: Run) -> str:
    """The run's folder, relative to the checkout when inside it (records name no machine's paths)."""
    return shown_path(RUNS / run.name)


def train_run(run: Run, eval_every: float, extra: list[str], in_process: bool) -> Path:
    """Train (or resume) one run and write its record; returns the record's path."""
    out = ROOT / run_dir(run)
    overrides = run.overrides(eval_every, extra)
    if not (out / "summary.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        resume = any((out / "checkpoints").glob("ckpt-*"))
        if in_process:  # one run at a time: process CPU time counts every thread of the process
            from flowgrpo.config import load_config
            from flowgrpo.train_config import TrainConfig, validate
            from flowgrpo.trainer import train

            train(validate(load_config(TrainConfig, ROOT / CONFIG, overrides)), resume=resume or None)
        else:
            cmd = [sys.executable, "-m", "flowgrpo", "train", CONFIG, *overrides, *(["--resume"] if resume else [])]
            # one thread, no accelerator: the race's axis is the CPU time of one core
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
            with open(out / "train.log", "a") as log:
                subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    rec = make_record(run, overrides, out)
    return write_record(record_path(run), rec)


def merged_rows(metrics: list[dict]) -> dict[int, dict]:
    """One row per iteration: a resumed run logs the iterations after its checkpoint again (the
    later row wins) and the end's evaluation is a row of its own at the last step (merged in)."""
    rows: dict[int, dict] = {}
    for m in metrics:
        rows.setdefault(int(m["step"]), {}).update(m)
    return dict(sorted(rows.items()))


def make_record(run: Run, overrides: list[str], out: Path) -> dict:
    from flowgrpo.config import load_config
    from flowgrpo.runlog import read_metrics
    from flowgrpo.train_config import TrainConfig

    cfg = load_config(TrainConfig, ROOT / CONFIG, overrides)
    per_iteration = cfg.sample.group_size * cfg.sample.prompts_per_step
    summary = json.loads((out / "summary.json").read_text())
    rows = merged_rows(read_metrics(out / "metrics.jsonl"))
    cpu = wall = 0.0
    evals = []
    for step, row in rows.items():
        cpu += row.get("time/cpu", 0.0)
        wall += row.get("time/wall", 0.0)
        if "eval/overall" in row:
            evals.append({"step": step, "cpu_minutes": cpu / 60, "wall_minutes": wall / 60,
                          "images": step * per_iteration,
                          **{k.removeprefix("eval/"): v for k, v in row.items()
                             if k.startswith("eval/") and not k.startswith("eval/image/")}})
    iterations = int(summary.get("iterations", max(rows, default=0)))
    return {"objective": run.objective, "setting": run.setting, "seed": run.seed, "budget_cpu_minutes": run.budget,
            "config": CONFIG, "overrides": overrides, "iterations": iterations,
            "images_per_iteration": per_iteration, "train_cpu_seconds": cpu, "train_wall_seconds": wall,
            "run_wall_seconds": summary.get("wall_seconds"),
            "cpu_seconds_per_iteration": cpu / max(1, iterations), "evals": evals}


def load_records(folder: Path | None = None) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder or RECORDS).glob("*.json"))]


# ---- the two stages ----------------------------------------------------------------------------
def curve(rec: dict, axis: str = "cpu_minutes") -> tuple[np.ndarray, np.ndarray]:
    ev = rec["evals"]
    return np.array([e[axis] for e in ev], dtype=float), np.array([e["overall"] for e in ev], dtype=float)


def area_score(rec: dict, budget: float) -> float:
    """Mean held-out accuracy over [0, budget] CPU-minutes (trapezoids between evaluations)."""
    x, y = curve(rec)
    end = min(budget, x[-1])
    if end <= 0:
        return float(y[0])
    nodes = np.append(x[x < end], end)  # the curve is linear between evaluations: exact on these
    return float(np.trapezoid(np.interp(nodes, x, y), nodes) / end)


def best_setting(objective: str, records: list[dict], seed: int, budget: float) -> str | None:
    """The objective's setting with the highest area score at the search seed and budget; None
    until every setting of its grid has a record."""
    found = {r["setting"]: r for r in records
             if r["objective"] == objective and r["seed"] == seed and r["budget_cpu_minutes"] == budget}
    if set(found) != set(OBJECTIVES[objective].grid):
        return None
    return max(found, key=lambda s: (area_score(found[s], budget), s))


def schedule(objectives: list[str], search_seed: int, search_budget: float, seeds: list[int], budget: float,
             eval_every: float, extra: list[str], workers: int, in_process: bool) -> None:
    """Every search run, then each objective's finals as soon as its search is complete."""
    if in_process and workers != 1:
        raise SystemExit("--in-process trains in this process: use --workers 1 (CPU time counts every thread)")
    search = [Run(o, s, search_seed, search_budget) for o in objectives for s in OBJECTIVES[o].grid]
    finals_started: set[str] = set()

    def finals_of(o: str) -> list[Run]:
        best = best_setting(o, load_records(), search_seed, search_budget)
        return [] if best is None else [Run(o, best, s, budget) for s in seeds]

    failed: list[str] = []

    def job(run: Run) -> None:
        if record_path(run).exists():
            return
        print(f"start {run.name}", flush=True)
        try:
            train_run(run, eval_every, extra, in_process)
        except Exception as exc:  # noqa: BLE001 - the other runs go on; the failures are listed at the end
            failed.append(f"{run.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            print(f"FAILED {failed[-1]} (its train.log has the rest)", flush=True)
            return
        print(f"done  {run.name}", flush=True)

    with ThreadPoolExecutor(workers) as pool:
        pending = {pool.submit(job, r) for r in search}
        while True:
            for o in objectives:
                if o not in finals_started and (runs := finals_of(o)):
                    finals_started.add(o)
                    pending |= {pool.submit(job, r) for r in runs}
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()
    if failed:
        raise SystemExit(f"{len(failed)} runs failed (rerun to retry them; finished ones are kept):\n  "
                         + "\n  ".join(failed))


# ---- report ------------------------------------------------------------------------------------
def crossing(x: np.ndarray, y: np.ndarray, level: float) -> float | None:
    """The first x at which the piecewise-linear curve reaches `level`; None if it never does."""
    if y[0] >= level:
        return float(x[0])
    for i in range(1, len(x)):
        if y[i] >= level:
            return float(x[i - 1] + (level - y[i - 1]) * (x[i] - x[i - 1]) / (y[i] - y[i - 1]))
    return None


def value_at(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """The curve at `at`, linear between evaluations; nan beyond the run's last evaluation."""
    return float(np.interp(at, x, y)) if x[0] <= at <= x[-1] else float("nan")


def time_to_target(rec: dict, axis: str, target: float = TARGET) -> float | None:
    x, y = curve(rec, axis)
    return crossing(x, y, y[0] + target)  # over the run's own base evaluation (step 0)


def cell(values: list, digits: int = 1) -> str:
    """mean ± 95% interval over seeds; runs that never reached the target are counted, not averaged."""
    reached = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "—"
    if len(reached) < len(values):
        shown = ", ".join(f"{v:.{digits}f}" for v in reached)
        return f"{len(reached)} of {len(values)} reached" + (f" ({shown})" if shown else "")
    m, h = mean_ci(reached)
    return f"{m:.{digits}f}" if not np.isfinite(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


def speedup(rival: list, best: list) -> tuple[float, float, float] | None:
    """Ratio of geometric mean times rival / best with its 95% Welch interval (on log times);
    None unless every run of both reached the target."""
    from scipy.stats import t

    if not rival or not best or any(v is None or v <= 0 for v in rival + best):
        return None
    a, b = np.log(rival), np.log(best)
    d = a.mean() - b.mean()
    if len(a) < 2 or len(b) < 2:
        return float(np.exp(d)), float("nan"), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return float(np.exp(d)), float(np.exp(d)), float(np.exp(d))
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    h = t.ppf(0.975, dof) * se
    return float(np.exp(d)), float(np.exp(d - h)), float(np.exp(d + h))


def finals(records: list[dict], budget: float, search_seed: int, search_budget: float) -> dict[str, list[dict]]:
    """objective -> its finalists' records: the search's best setting at every seed but the search seed."""
    out: dict[str, list[dict]] = {}
    for o in OBJECTIVES:
        best = best_setting(o, records, search_seed, search_budget)
        recs = [r for r in records if (r["objective"], r["setting"], r["budget_cpu_minutes"]) == (o, best, budget)
                and r["seed"] != search_seed]
        if recs:
            out[o] = sorted(recs, key=lambda r: r["seed"])
    return out


def race_table(data: dict[str, list[dict]], marks=MARKS, target: float = TARGET) -> str:
    lines = [f"| objective | setting | seeds | base | CPU-min to +{target:.2f} | images to +{target:.2f} | "
             + " | ".join(f"held-out at {m:g} CPU-min" for m in marks) + " | CPU s an iteration |",
             "| --- " * (6 + len(marks)) + "|"]
    for o, recs in data.items():
        at = [cell([value_at(*curve(r), m) for r in recs], 3) for m in marks]
        images = [time_to_target(r, "images", target) for r in recs]
        lines.append(f"| {OBJECTIVES[o].label} | {', '.join(sorted({r['setting'] for r in recs}))} | {len(recs)} | "
                     f"{cell([r['evals'][0]['overall'] for r in recs], 3)} | "
                     f"{cell([time_to_target(r, 'cpu_minutes', target) for r in recs])} | "
                     f"{cell(images, 0)} | " + " | ".join(at)
                     + f" | {cell([r['cpu_seconds_per_iteration'] for r in recs], 2)} |")
    return "\n".join(lines)


def speedup_lines(data: dict[str, list[dict]], rival: str = RIVAL, target: float = TARGET) -> str:
    if rival not in data:
        return f"no finished {rival} runs: no speed-up"
    times = {o: [time_to_target(r, "cpu_minutes", target) for r in recs] for o, recs in data.items()}
    reached = {o: t for o, t in times.items() if all(v is not None for v in t)}
    if not reached:
        return f"no objective reached +{target:.2f} in every seed"
    best = min(reached, key=lambda o: float(np.mean(reached[o])))
    budget = max(r["budget_cpu_minutes"] for r in data[rival])
    s = speedup(times[rival], times[best])
    claim = PAPER_CLAIMS.get(best, "")
    if s is None:
        r = sum(v is not None for v in times[rival])
        return (f"fastest to +{target:.2f}: {OBJECTIVES[best].label}, {np.mean(times[best]):.1f} CPU-min; "
                f"{OBJECTIVES[rival].label} reached it in {r} of {len(times[rival])} runs within {budget:g}: "
                f"speed-up at least {budget / np.mean(times[best]):.1f}x" + (f" (paper: {claim})" if claim else ""))
    ratio, lo, hi = s
    return (f"fastest to +{target:.2f}: {OBJECTIVES[best].label}; speed-up over {OBJECTIVES[rival].label} "
            f"{ratio:.1f}x (95% interval {lo:.1f}-{hi:.1f}x, geometric means of CPU-minutes)"
            + (f" (paper: {claim})" if claim else ""))


def search_table(records: list[dict], seed: int, budget: float) -> str:
    lines = ["| objective | setting | overrides | mean held-out over the budget | held-out at the end | best |",
             "| --- | --- | --- | --- | --- | --- |"]
    for o, obj in OBJECTIVES.items():
        best = best_setting(o, records, seed, budget)
        for s, over in obj.grid.items():
            r = next((r for r in records if (r["objective"], r["setting"], r["seed"], r["budget_cpu_minutes"])
                      == (o, s, seed, budget)), None)
            if r is None:
                continue
            lines.append(f"| {obj.label} | {s} | `{' '.join(over)}` | {area_score(r, budget):.3f} | "
                         f"{r['evals'][-1]['overall']:.3f} | {'**yes**' if s == best else ''} |")
    return "\n".join(lines)


def banded(recs: list[dict], axis: str, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean curve over seeds on `grid` and its 95% half-width (nan where fewer than two seeds reach)."""
    ys = np.array([[value_at(*curve(r, axis), g) for g in grid] for r in recs])
    stats = [mean_ci(col) for col in ys.T]
    return np.array([m for m, _ in stats]), np.array([h for _, h in stats])


def figure(data: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, axis, label in ((axes[0], "cpu_minutes", "CPU-minutes of training (one thread)"),
                            (axes[1], "images", "images sampled")):
        top = max(r["evals"][-1][axis] for recs in data.values() for r in recs)
        grid = np.linspace(0.0, top, 121)
        for i, (o, recs) in enumerate(data.items()):
            m, h = banded(recs, axis, grid)
            ax.plot(grid, m, color=f"C{i % 10}", label=f"{OBJECTIVES[o].label} ({len(recs)})")
            ax.fill_between(grid, m - h, m + h, color=f"C{i % 10}", alpha=0.15)
        base = np.mean([r["evals"][0]["overall"] for recs in data.values() for r in recs])
        ax.axhline(base + TARGET, color="k", ls=":", lw=1, label=f"base + {TARGET:.2f}")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out strict accuracy (20-step ODE)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def shown_path(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(records: list[dict], budget: float, search_seed: int, search_budget: float, figure_path: Path) -> str:
    data = finals(records, budget, search_seed, search_budget)
    parts = [f"## The search (seed {search_seed}, {search_budget:g} CPU-minutes)\n", search_table(records, search_seed,
                                                                                                     search_budget)]
    if data:
        parts += [f"\n## The race ({budget:g} CPU-minutes a run, the best setting, fresh seeds)\n", race_table(data),
                  "", speedup_lines(data), f"\nfigure: {shown_path(figure(data, figure_path))}"]
        cpu = sum(r["train_cpu_seconds"] for r in records) / 3600
        wall = sum(r["run_wall_seconds"] or 0 for r in records) / 3600
        parts.append(f"\n{len(records)} runs: {cpu:.1f} CPU-hours of training, {wall:.1f} hours of run wall time "
                     "(evaluations and loading included)")
    return "\n".join(parts)


# ---- cost --------------------------------------------------------------------------------------
def measure(objectives: list[str], iterations: int, extra: list[str]) -> dict:
    """CPU seconds of one training iteration of each objective (its first setting; the mean over
    the iterations after the first, which warms caches) and of one held-out evaluation, measured
    in this process on one thread, one at a time; added to RUNS/cost.json for `plan`."""
    import time

    import torch

    from flowgrpo.config import load_config
    from flowgrpo.runlog import read_metrics
    from flowgrpo.train_config import TrainConfig, validate
    from flowgrpo.trainer import Trainer, evaluate, train

    torch.set_num_threads(1)
    old = RUNS / "cost.json"  # objectives measured before are kept
    cost: dict = json.loads(old.read_text()) if old.exists() else {"per_iteration": {}}
    cost["iterations"] = iterations
    for o in objectives:
        run = Run(o, next(iter(OBJECTIVES[o].grid)), 0, 60.0)
        out = RUNS / "cost" / o
        over = [*run.overrides(5.0, []), f"run.output_dir={out}", f"optim.steps={iterations}", "run.max_cpu_minutes=0",
                "run.eval_every_cpu_minutes=0", "run.eval_before=false", "data.test=", "run.save_every=0", *extra]
        train(validate(load_config(TrainConfig, ROOT / CONFIG, over)))
        cpu = [r["time/cpu"] for r in read_metrics(out / "metrics.jsonl") if "time/cpu" in r]
        cost["per_iteration"][o] = float(np.mean(cpu[1:] or cpu))
        print(f"{o}: {cost['per_iteration'][o]:.2f} CPU s an iteration ({', '.join(f'{c:.2f}' for c in cpu)})",
              flush=True)
    first = Run(objectives[0], next(iter(OBJECTIVES[objectives[0]].grid)), 0, 60.0)
    cfg = validate(load_config(TrainConfig, ROOT / CONFIG,
                               [*first.overrides(5.0, []), f"run.output_dir={RUNS / 'cost' / 'eval'}", *extra]))
    trainer = Trainer(cfg)
    start = time.process_time()
    evaluate(trainer, "cost")
    cost["evaluation"] = time.process_time() - start
    print(f"one held-out evaluation: {cost['evaluation']:.1f} CPU s", flush=True)
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / "cost.json").write_text(json.dumps(cost, indent=1))
    return cost


def plan(objectives: list[str], seeds: list[int], budget: float, search_budget: float, eval_every: float,
         cost: dict | None = None) -> str:
    n_search = sum(len(OBJECTIVES[o].grid) for o in objectives)
    n_final = len(objectives) * len(seeds)
    train_h = (n_search * search_budget + n_final * budget) / 60
    # before, at every mark short of the end, and at the end
    evals = n_search * (math.ceil(search_budget / eval_every) + 1) + n_final * (math.ceil(budget / eval_every) + 1)
    lines = [f"{n_search} search runs x {search_budget:g} CPU-min + {n_final} final runs x {budget:g} CPU-min: "
             f"{train_h:.1f} CPU-hours of training, {evals:.0f} held-out evaluations"]
    if cost:
        eval_h = evals * cost["evaluation"] / 3600
        lines.append(f"evaluations at {cost['evaluation']:.0f} CPU s each (measured): {eval_h:.1f} CPU-hours; "
                     f"total {train_h + eval_h:.1f} CPU-hours, {(train_h + eval_h) / 16:.1f} hours on 16 cores")
    else:
        lines.append("evaluation cost unknown: python scripts/race.py measure")
    for o in objectives:
        per = (cost or {}).get("per_iteration", {}).get(o)
        its = f"; {per:.1f} CPU s an iteration: {60 * budget / per:.0f} iterations in {budget:g} min" if per else ""
        lines.append(f"  {o}: {', '.join(OBJECTIVES[o].grid)} ({OBJECTIVES[o].why}){its}")
    return "\n".join(lines)


def main(argv=None) -> None:
    global RECORDS, RUNS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "report", "plan", "measure"])
    ap.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    ap.add_argument("--budget-cpu-minutes", type=float, default=60.0, help="training CPU time of a final run")
    ap.add_argument("--search-budget-cpu-minutes", type=float, default=30.0, help="of a search run")
    ap.add_argument("--eval-every-cpu-minutes", type=float, default=2.5,
                    help="held-out evaluations this far apart in training CPU time (about 19 CPU s each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="of the finals")
    ap.add_argument("--search-seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="runs at a time, one CPU thread each")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (e.g. a smaller test)")
    ap.add_argument("--records", default=str(RECORDS))
    ap.add_argument("--runs", default=str(RUNS))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "race.png"))
    ap.add_argument("--in-process", action="store_true", help="train in this process (tests; --workers 1)")
    ap.add_argument("--iterations", type=int, default=3, help="measure: iterations an objective")
    args = ap.parse_args(argv)
    RECORDS, RUNS = Path(args.records), Path(args.runs)
    if args.action == "measure":
        measure(args.objectives, args.iterations, args.set)
    elif args.action == "plan":
        cost = json.loads((RUNS / "cost.json").read_text()) if (RUNS / "cost.json").exists() else None
        print(plan(args.objectives, args.seeds, args.budget_cpu_minutes, args.search_budget_cpu_minutes,
                   args.eval_every_cpu_minutes, cost))
    elif args.action == "run":
        schedule(args.objectives, args.search_seed, args.search_budget_cpu_minutes, args.seeds,
                 args.budget_cpu_minutes, args.eval_every_cpu_minutes, args.set, args.workers, args.in_process)
    else:
        print(report(load_records(), args.budget_cpu_minutes, args.search_seed, args.search_budget_cpu_minutes,
                     Path(args.figure)))


if __name__ == "__main__":
    main()

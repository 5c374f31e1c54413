"""The race (scripts/race.py) and the trainer's CPU-time budget it stands on: every condition is a
valid change of configs/demo.yaml, a budget ends a run evaluated and a resume continues its
clock, the two stages run end to end on the tiny shapes model, and the report's arithmetic
(time to target, intervals over seeds, speed-ups) is right on curves made by hand."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, load_script, tiny_overrides

from flowgrpo.config import load_config
from flowgrpo.runlog import read_metrics
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.schedules import cpu_marks
from flowgrpo.trainer import train


@pytest.fixture(scope="module")
def race():
    return load_script("race")


def tiny(model: Path, out: Path, extra=()) -> list[str]:
    """The tiny model on the demo's tags with a held-out evaluation of 7 images, 2 steps."""
    keep = [o for o in tiny_overrides(model, out) if not o.startswith(("data.test=", "optim.steps="))]
    return keep + ["data.test=shapes:test", "run.eval_before=true", "run.eval_images_per_prompt=1", "run.eval_steps=2",
                   "data.train_tags=[colors,counting]", "data.test_tags=[colors,counting]", "sample.guidance=1.0",
                   *extra]


# ---- the trainer's CPU budget ------------------------------------------------------------------
def test_cpu_marks_evaluate_at_each_multiple_passed_and_stop_at_the_budget():
    run = TrainConfig().run
    assert cpu_marks(run, 0.0, 1e9) == (False, False)  # both off by default
    run.eval_every_cpu_minutes, run.max_cpu_minutes = 0.5, 2.0  # every 30 s, stop at 120 s
    assert cpu_marks(run, 0.0, 29.9) == (False, False)
    assert cpu_marks(run, 29.9, 30.0) == (True, False)
    assert cpu_marks(run, 30.0, 59.0) == (False, False)
    assert cpu_marks(run, 59.0, 95.0) == (True, False)  # two marks passed in one iteration: one evaluation
    assert cpu_marks(run, 100.0, 120.0) == (True, True)


def test_a_cpu_budget_ends_the_run_evaluated_and_a_resume_continues_its_clock(tiny_shapes_model, tmp_path):
    out = tmp_path / "run"
    # a budget of a nanominute ends the run after its first iteration, whatever the machine's speed;
    # marks as small put an evaluation after every iteration
    summary = train(validate(load_config(TrainConfig, None, tiny(
        tiny_shapes_model, out, ["optim.steps=6", "run.max_cpu_minutes=1e-9", "run.save_every=1"]))))
    assert summary["iterations"] == 1 and summary["stopped_by_cpu_budget"]["iteration"] == 1
    assert "after" in summary and "before" in summary
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 1]  # before, the iteration, the end's evaluation
    assert rows[1]["time/cpu"] > 0 and rows[1]["time/wall"] > 0 and "eval/overall" in rows[2]
    assert json.loads((out / "summary.json").read_text())["train_cpu_seconds"] == pytest.approx(rows[1]["time/cpu"])
    # resumed with a budget 1 microsecond past the clock: the next iteration passes it, with marks in between
    clock = summary["train_cpu_seconds"]
    summary = train(validate(load_config(TrainConfig, None, tiny(
        tiny_shapes_model, out, ["optim.steps=6", f"run.max_cpu_minutes={(clock + 1e-6) / 60!r}",
                                 f"run.eval_every_cpu_minutes={1e-9!r}"]))), resume=True)
    assert summary["iterations"] == 2 and summary["stopped_by_cpu_budget"]["iteration"] == 2
    rows = read_metrics(out / "metrics.jsonl")
    assert summary["train_cpu_seconds"] == pytest.approx(sum(r.get("time/cpu", 0) for r in rows[:2] + rows[3:]))
    assert summary["train_cpu_seconds"] > clock
    # no periodic evaluation at the stopping iteration: the end's evaluation is the one
    assert [r["step"] for r in rows if "eval/overall" in r] == [0, 1, 2]


def test_negative_budgets_are_refused():
    from flowgrpo.config import ConfigError

    with pytest.raises(ConfigError, match="run.max_cpu_minutes"):
        validate(load_config(TrainConfig, None, ["run.max_cpu_minutes=-1"]))


# ---- the conditions ----------------------------------------------------------------------------
def test_every_setting_is_a_valid_change_of_the_demo_with_its_objective(race):
    demo = validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml"))
    expected = {"flow_grpo": ("ratio", "flow_sde"), "flow_grpo_fast": ("ratio", "flow_sde"),
                "mixgrpo": ("ratio", "flow_sde"), "mixgrpo_flash": ("ratio", "flow_sde"), "awm": ("awm", "ode"),
                "nft_official": ("nft", "dpm2"), "nft_demo": ("nft", "ode"), "dgpo": ("dgpo", "dpm2"),
                "reward_filtered": ("reward_filtered", "ode")}
    assert set(race.OBJECTIVES) == set(expected)
    for name, obj in race.OBJECTIVES.items():
        assert len(obj.grid) >= 2, name
        for setting in obj.grid:
            cfg = validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml",
                                       race.Run(name, setting, 0, 60).overrides(5, [])))
            assert (cfg.optim.policy_loss, cfg.sample.kind) == expected[name], name
            # the task is the demo's: base, tags, held-out protocol, reward and images an iteration
            assert cfg.model.path == demo.model.path and cfg.data == demo.data and cfg.reward == demo.reward
            assert (cfg.sample.group_size, cfg.sample.prompts_per_step) == (8, 8)
            assert cfg.run.eval_images_per_prompt == 32 and cfg.run.eval_steps == 20 and cfg.run.threads == 1
            assert cfg.run.max_cpu_minutes == 60 and cfg.run.eval_every_cpu_minutes == 5
    nft = validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml",
                               race.Run("nft_official", "lr3e-4", 0, 60).overrides(5, [])))
    o = nft.optim  # the official values (configs/recipes/sd35m_nft_geneval.yaml)
    assert (o.adv_std, o.drop_zero_signal, o.timestep_subset, o.nft_kl_weight, o.ema_decay, o.lr) == \
        ("global", False, "per_sample", 1e-4, 0.9, 3e-4)
    assert nft.sample.num_steps == 10 and race.OBJECTIVES["nft_demo"].overrides == ()


# ---- end to end on the tiny model --------------------------------------------------------------
def test_the_race_runs_both_stages_and_reports_on_the_tiny_model(race, tiny_shapes_model, tmp_path, monkeypatch):
    small = {"nft_demo": dataclasses.replace(race.OBJECTIVES["nft_demo"],
                                             grid={"lr1e-3": ("optim.lr=1e-3",), "lr1e-2": ("optim.lr=1e-2",)}),
             "flow_grpo": dataclasses.replace(race.OBJECTIVES["flow_grpo"], grid={"lr1e-2": ("optim.lr=1e-2",)})}
    monkeypatch.setattr(race, "OBJECTIVES", small)
    over = [o for o in tiny(tiny_shapes_model, tmp_path) if not o.startswith(("run.output_dir", "optim.lr="))]
    over += ["optim.steps=3"]  # --set comes last: the grid keeps its learning rates
    args = ["--objectives", "nft_demo", "flow_grpo", "--budget-cpu-minutes", "1", "--search-budget-cpu-minutes",
            "0.5", "--eval-every-cpu-minutes", "1e-9", "--seeds", "1", "--records", str(tmp_path / "records"),
            "--runs", str(tmp_path / "runs"), "--figure", str(tmp_path / "race.png"), "--set", *over]
    race.main(["run", "--in-process", "--workers", "1", *args])
    names = sorted(p.stem for p in (tmp_path / "records").glob("*.json"))
    best = race.best_setting("nft_demo", race.load_records(tmp_path / "records"), 0, 0.5)
    assert names == sorted(["flow_grpo-lr1e-2-b0.5-seed0", "flow_grpo-lr1e-2-b1-seed1", "nft_demo-lr1e-3-b0.5-seed0",
                            "nft_demo-lr1e-2-b0.5-seed0", f"nft_demo-{best}-b1-seed1"])
    rec = json.loads((tmp_path / "records" / "flow_grpo-lr1e-2-b1-seed1.json").read_text())
    # optim.steps=3 ends the tiny runs before their CPU budget; marks this small evaluate every iteration
    assert rec["iterations"] == 3 and [e["step"] for e in rec["evals"]] == [0, 1, 2, 3]
    assert [e["images"] for e in rec["evals"]] == [0, 8, 16, 24]
    cpu = [e["cpu_minutes"] for e in rec["evals"]]
    assert cpu[0] == 0 and all(a < b for a, b in zip(cpu, cpu[1:]))
    assert rec["train_cpu_seconds"] == pytest.approx(60 * cpu[-1])
    assert rec["cpu_seconds_per_iteration"] == pytest.approx(rec["train_cpu_seconds"] / 3)
    assert "optim.lr=1e-2" in rec["overrides"] and rec["seed"] == 1
    before = {r.name for r in (tmp_path / "records").glob("*.json")}
    race.main(["run", "--in-process", "--workers", "1", *args])  # finished runs are reused, none retrained
    assert {r.name for r in (tmp_path / "records").glob("*.json")} == before
    text = race.report(race.load_records(tmp_path / "records"), 1, 0, 0.5, tmp_path / "race.png")
    assert "| NFT, the demo's settings |" in text and "| Flow-GRPO (ratio, flow_sde) |" in text
    assert (tmp_path / "race.png").exists()
    # the cost of the full race: CPU seconds an iteration and an evaluation, then the plan built on them
    race.main(["measure", "--objectives", "nft_demo", "--iterations", "2", "--runs", str(tmp_path / "runs"),
               "--set", *over])
    cost = json.loads((tmp_path / "runs" / "cost.json").read_text())
    assert cost["per_iteration"]["nft_demo"] > 0 and cost["evaluation"] > 0
    text = race.plan(["nft_demo", "flow_grpo"], [1, 2, 3], 60.0, 30.0, 2.5, cost)
    # 3 search runs x 30 + 6 finals x 60 CPU-minutes; evaluations before, every 2.5 and at the end
    assert text.startswith("3 search runs x 30 CPU-min + 6 final runs x 60 CPU-min: 7.5 CPU-hours of training, "
                           f"{3 * 13 + 6 * 25} held-out evaluations")


# ---- the report's arithmetic -------------------------------------------------------------------
def synthetic(objective, seed, xs, ys, setting="a", budget=60.0, per_iteration=64, cpu_per_iteration=6.0):
    """A record whose evaluation i is at xs[i] CPU-minutes (iterations at cpu_per_iteration seconds)."""
    evals = [{"step": round(60 * x / cpu_per_iteration), "cpu_minutes": x, "images": round(60 * x / cpu_per_iteration)
              * per_iteration, "overall": y} for x, y in zip(xs, ys)]
    return {"objective": objective, "setting": setting, "seed": seed, "budget_cpu_minutes": budget, "evals": evals,
            "cpu_seconds_per_iteration": cpu_per_iteration, "train_cpu_seconds": 60 * xs[-1],
            "run_wall_seconds": 70 * xs[-1]}


def test_time_to_target_is_the_first_interpolated_crossing_over_the_runs_own_base(race):
    x = np.array([0.0, 10.0, 20.0, 30.0])
    assert race.crossing(x, np.array([0.4, 0.45, 0.55, 0.45]), 0.5) == pytest.approx(15.0)
    assert race.crossing(x, np.array([0.4, 0.6, 0.3, 0.7]), 0.5) == pytest.approx(5.0)  # the first, not a later one
    assert race.crossing(x, np.array([0.4, 0.45, 0.49, 0.3]), 0.5) is None
    assert race.value_at(x, np.array([0.4, 0.5, 0.6, 0.7]), 25.0) == pytest.approx(0.65)
    assert math.isnan(race.value_at(x, np.array([0.4, 0.5, 0.6, 0.7]), 31.0))  # beyond the run: unknown
    rec = synthetic("nft_demo", 1, [0, 5, 10], [0.30, 0.36, 0.42])
    assert race.time_to_target(rec, "cpu_minutes") == pytest.approx(5 + 5 * 0.04 / 0.06)
    assert race.time_to_target(rec, "images") == pytest.approx((50 + 50 * 0.04 / 0.06) * 64)


def test_cells_intervals_and_speedups(race):
    m, h = race.mean_ci([10.0, 12.0, 14.0])
    assert m == pytest.approx(12.0) and h == pytest.approx(4.302653 * 2.0 / math.sqrt(3), rel=1e-5)
    assert race.cell([10.0, 12.0, 14.0]) == f"12.0 ± {h:.1f}"
    assert race.cell([10.0, None, 14.0]) == "2 of 3 reached (10.0, 14.0)"  # a censored seed is not averaged
    ratio, lo, hi = race.speedup([40.0, 50.0, 60.0], [10.0, 10.0, 10.0])
    a = np.log([40.0, 50.0, 60.0])
    assert ratio == pytest.approx(math.exp(a.mean() - math.log(10.0)))
    half = 4.302653 * a.std(ddof=1) / math.sqrt(3)  # the best's log times have no spread: the rival's dof
    assert lo == pytest.approx(ratio * math.exp(-half), rel=1e-5)
    assert hi == pytest.approx(ratio * math.exp(half), rel=1e-5)
    assert race.speedup([40.0, None], [10.0, 10.0]) is None


def test_the_search_picks_the_best_area_and_the_report_uses_fresh_seeds(race, tmp_path, monkeypatch):
    monkeypatch.setattr(race, "ROOT", tmp_path)
    xs = [0, 5, 10, 20, 30, 60]
    records = [
        # search, seed 0, 30 CPU-minutes: lr1e-3 rises earlier, so its area is larger
        synthetic("nft_demo", 0, [0, 10, 20, 30], [0.30, 0.45, 0.45, 0.45], "lr1e-3", 30.0),
        synthetic("nft_demo", 0, [0, 10, 20, 30], [0.30, 0.30, 0.40, 0.50], "lr5e-4", 30.0),
        synthetic("nft_demo", 0, [0, 10, 20, 30], [0.30, 0.31, 0.32, 0.33], "lr2e-3", 30.0),
        synthetic("flow_grpo", 0, [0, 10, 20, 30], [0.30, 0.32, 0.34, 0.36], "lr1e-4", 30.0),
        synthetic("flow_grpo", 0, [0, 10, 20, 30], [0.30, 0.30, 0.30, 0.30], "lr2e-4", 30.0),
        synthetic("flow_grpo", 0, [0, 10, 20, 30], [0.30, 0.29, 0.28, 0.27], "lr5e-4", 30.0),
        # finals: the winner at seeds 1-3 (and a loser's final, which must be ignored)
        *[synthetic("nft_demo", s, xs, [0.30, 0.35, 0.40 + d, 0.45, 0.50, 0.55], "lr1e-3")
          for s, d in ((1, 0.01), (2, 0.03), (3, -0.02))],
        synthetic("nft_demo", 1, xs, [0.30, 0.50, 0.50, 0.50, 0.50, 0.50], "lr5e-4"),
        *[synthetic("flow_grpo", s, xs, [0.30, 0.31, 0.32, 0.34, 0.37, 0.40 + d], "lr1e-4")
          for s, d in ((1, -0.01), (2, 0.01), (3, 0.02))],
    ]
    assert race.area_score(records[0], 30.0) == pytest.approx((0.375 * 10 + 0.45 * 20) / 30)
    assert race.best_setting("nft_demo", records, 0, 30.0) == "lr1e-3"
    assert race.best_setting("flow_grpo", records, 0, 30.0) == "lr1e-4"
    assert race.best_setting("awm", records, 0, 30.0) is None  # no search yet
    data = race.finals(records, 60.0, 0, 30.0)
    assert [r["seed"] for r in data["nft_demo"]] == [1, 2, 3] and {r["setting"] for r in data["nft_demo"]} == {"lr1e-3"}
    table = race.race_table(data)
    row = next(line for line in table.splitlines() if line.startswith("| NFT, the demo's settings"))
    # +0.10 over the base 0.30, linear between evaluations
    t = [5 + 5 * 0.05 / 0.06, 5 + 5 * 0.05 / 0.08, 10 + 10 * 0.02 / 0.07]
    m, h = race.mean_ci(t)
    assert f"| {m:.1f} ± {h:.1f} |" in row
    assert f"| {race.mean_ci([x * 10 * 64 for x in t])[0]:.0f} ± " in row  # 10 iterations a CPU-minute, 64 images each
    m10, h10 = race.mean_ci([0.41, 0.43, 0.38])
    assert f"| {m10:.3f} ± {h10:.3f} |" in row  # held-out at 10 CPU-minutes
    frow = next(line for line in table.splitlines() if line.startswith("| Flow-GRPO"))
    assert "| 2 of 3 reached (52.5, 48.0) |" in frow  # seed 1 ends at 0.39: censored, not averaged
    text = race.speedup_lines(data)
    assert "NFT, the demo's settings" in text and f"at least {60 / np.mean(t):.1f}x" in text
    text = race.report(records, 60.0, 0, 30.0, tmp_path / "race.png")
    assert "| **yes** |" in text and (tmp_path / "race.png").exists()

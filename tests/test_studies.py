"""scripts/studies.py: every condition is a valid change of configs/demo.yaml, and the report's
statistics (means with t-intervals across seeds, differences paired by seed) are right."""

import json
import sys

import numpy as np
import pytest
from helpers import ROOT, load_script

from flowgrpo.config import load_config
from flowgrpo.rewards import make_reward
from flowgrpo.train_config import TrainConfig, validate



@pytest.fixture(scope="module")
def studies():
    return load_script("studies")


def test_every_condition_changes_only_the_reward_of_the_demo_config(studies):
    demo = validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml"))
    for name, overrides in studies.CONDITIONS.items():
        cfg = validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml", overrides))
        assert cfg.optim == demo.optim and cfg.sample == demo.sample and cfg.model == demo.model, name
        for reward, kwargs in cfg.reward.args.items():
            assert make_reward(reward, **kwargs) is not None, (name, reward)
    for study, conds in studies.STUDIES.items():
        assert conds[0] == "verifier" and set(conds) <= set(studies.CONDITIONS), study


def record(cond, seed, after, before=0.4, size=0.15):
    stats = {"size": size, "saturation": 0.8, "sharpness": 60.0, "size_ref": 0.18, "saturation_ref": 0.84,
             "sharpness_ref": 75.0}
    curves = [{"step": i + 1, "reward/mean": 0.5, "adv/amplification": 3.0, "reward/shapes_partial/strict": 0.3 + i / 100}
              for i in range(10)]
    return {"condition": cond, "seed": seed, "steps": 8, "before": {"overall": before, "image_stats": stats},
            "after": {"overall": after, "partial": 0.6, "image_stats": stats},
            "change": {"overall": after - before}, "wall_seconds": 60.0,
            "evals": [{"step": 0, "eval/overall": before, "eval/image/size": size, "eval/image/sharpness": 60.0},
                      {"step": 8, "eval/overall": after, "eval/image/size": size, "eval/image/sharpness": 60.0}], "curves": curves}


def test_report_means_intervals_and_paired_differences(studies, tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "RECORDS", tmp_path)
    monkeypatch.setattr(studies, "ROOT", tmp_path)
    (tmp_path / "docs" / "figures").mkdir(parents=True)
    for seed, (v, p) in enumerate([(0.50, 0.40), (0.56, 0.50), (0.62, 0.48)]):
        for cond, after in (("verifier", v), ("pointwise_biased", p)):
            (tmp_path / f"{cond}-s8-seed{seed}.json").write_text(json.dumps(record(cond, seed, after)))
    data = studies.load(["verifier", "pointwise_biased", "pairwise_biased"], 8)
    assert list(data) == ["verifier", "pointwise_biased"] and [r["seed"] for r in data["verifier"]] == [0, 1, 2]
    m, h = studies.mean_ci([0.50, 0.56, 0.62])
    assert m == pytest.approx(0.56) and h == pytest.approx(4.3027 * 0.06 / np.sqrt(3), rel=1e-4)
    text = studies.table(data)
    row = next(line for line in text.splitlines() if line.startswith("| pointwise_biased"))
    paired = [0.40 - 0.50, 0.50 - 0.56, 0.48 - 0.62]
    pm, ph = studies.mean_ci(paired)
    assert f"{pm:.3f} ± {ph:.3f}" in row  # differences are paired by seed, not a difference of means
    assert "| 0.385 ± 0.000 |" in row  # train-sample strict, the last fifth of the curve: mean of 0.38 and 0.39
    assert studies.mean_ci([0.3])[1] != studies.mean_ci([0.3])[1]  # nan with one seed
    contrast = studies.contrast_table(data, [("pointwise_biased", "verifier"), ("verifier", "pairwise")])
    row = next(line for line in contrast.splitlines() if line.startswith("| pointwise_biased - verifier"))
    assert f"{pm:.3f} ± {ph:.3f}" in row and "pairwise" not in contrast.split("| --- ")[-1]
    assert "**shown**" in row.split("|")[3]  # -0.100 ± 0.099 excludes zero
    assert "**shown**" not in row.split("|")[5]  # size: no difference
    assert studies.figure("hacking", data).exists()
    traj = studies.trajectory_table(data, [("pointwise_biased", "verifier")])
    assert "| it 8 |" in traj and f"{pm:.3f} ± {ph:.3f} **shown**" in traj  # the last evaluation's paired gap
    assert studies.figure("hacking", data, steps=16).name == "study_hacking_s16.png"
    # under the advantage mix the summed reward is never normalised: no amplification to report
    mixed = record("adversarial_verifier_advmix", 0, 0.5)
    assert studies._amplification(mixed) != studies._amplification(mixed)
    assert studies._amplification(record("verifier", 0, 0.5)) == pytest.approx(3.0)


def test_runs_are_claimed_once_and_a_dead_runners_claim_is_taken_over(studies, tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(studies, "RUNS", tmp_path)
    assert studies.claim("verifier", 0, 8)
    assert not studies.claim("verifier", 0, 8)  # held by a live process (this one)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "verifier-s8-seed1").mkdir()
    (tmp_path / "verifier-s8-seed1" / "claim").write_text(dead)
    assert studies.claim("verifier", 1, 8)
    assert (tmp_path / "verifier-s8-seed1" / "claim").read_text() == str(__import__("os").getpid())

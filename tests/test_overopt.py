"""The over-optimisation study (scripts/overopt.py): every condition is a valid training config
with gold scored beside the proxy, and the analysis (peak, drop, when gold fell, alarm lead,
false alarms) is right on curves made by hand."""

import json

import numpy as np
import pytest
from helpers import ROOT, load_script

from flowgrpo.config import load_config
from flowgrpo.train_config import TrainConfig, validate


@pytest.fixture(scope="module")
def overopt():
    return load_script("overopt")


def test_every_condition_is_a_valid_config_that_scores_gold(overopt):
    for name, (config, extra) in overopt.CONDITIONS.items():
        cfg = validate(load_config(TrainConfig, ROOT / config, overopt.GOLD + extra))
        # gold/total is the verifier alone; the pairwise run also logs the proxy's own score at weight 0
        assert dict(cfg.reward.gold) == ({"shapes_partial": 1.0, "shapes_proxy": 0.0} if name == "pairwise"
                                         else {"shapes_partial": 1.0}), name
        assert "shapes_partial" not in cfg.reward.weights, name  # gold never trained on
        assert cfg.monitor.base_kl_images > 0
    anchors = {n: validate(load_config(TrainConfig, ROOT / c, e)).optim.nft_kl_weight
               for n, (c, e) in overopt.CONDITIONS.items() if n != "ratio"}
    assert anchors == {"pointwise": 0.0, "pairwise": 0.0, "kl_0.3": 0.3, "kl_1": 1.0, "adversarial": 0.0}


def record(gold, proxy=None, alarms=None, seed=0, cond="pointwise"):
    n = len(gold)
    return {"condition": cond, "seed": seed, "evals": [],
            "curves": {"step": list(range(1, n + 1)), "gold": list(gold),
                       "proxy": list(proxy if proxy is not None else np.linspace(0.5, 0.9, n)),
                       "base_kl": list(np.linspace(0, 1e-3, n)), "alarms": alarms or [[] for _ in range(n)]}}


def test_smooth_is_a_trailing_mean(overopt):
    np.testing.assert_allclose(overopt.smooth([1, 2, 3, 4, 5], window=2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(overopt.smooth([2, 4, 6], window=20), [2, 3, 4])


def test_outcome_finds_the_peak_the_fall_and_the_alarm(overopt):
    # gold rises 0.5 -> 0.7 over 100 iterations, then falls to 0.5 over the next 100
    gold = np.concatenate([np.linspace(0.5, 0.7, 100), np.linspace(0.7, 0.5, 100)])
    alarms = [[] for _ in range(200)]
    alarms[130] = ["divergence"]
    o = overopt.outcome(record(gold, alarms=alarms))
    windows = [np.mean(gold[i - 19:i + 1]) for i in range(19, 200)]  # the 20-iteration means
    assert o["gold_peak"] == pytest.approx(max(windows))
    assert o["gold_peak_step"] == 20 + int(np.argmax(windows))  # steps count from 1
    assert 100 <= o["gold_peak_step"] <= 112
    assert o["drop"] == pytest.approx(o["gold_peak"] - np.mean(gold[-20:]))
    # smoothed gold is 0.05 below its peak about 0.05 / (0.2 / 100) = 25 iterations after the raw peak, plus the lag
    assert 120 < o["fell_step"] < 145
    assert o["alarm_step"] == 131 and o["alarms"] == ["divergence"]
    flat = overopt.outcome(record(np.full(200, 0.6)))
    assert flat["fell_step"] is None and flat["drop"] == pytest.approx(0.0, abs=1e-12) and flat["alarm_step"] is None


def alarming(n, *spans):
    """Alarm lists for n iterations, firing on the iterations in the given (start, stop) spans (0-based)."""
    out = [[] for _ in range(n)]
    for start, stop in spans:
        for i in range(start, stop):
            out[i] = ["drift/latent_norm"]
    return out


def test_tables_count_leads_and_false_alarms(overopt):
    falling = np.concatenate([np.linspace(0.5, 0.7, 100), np.linspace(0.7, 0.5, 100)])
    data = {"pointwise": [record(falling, alarms=alarming(200, (110, 200)), seed=0),
                          record(falling, alarms=alarming(200, (20, 21)), seed=1)],  # a blip, not sustained
            "kl_1": [record(np.full(200, 0.6), alarms=alarming(200, (50, 51)), seed=0, cond="kl_1")]}
    text = overopt.alarm_table(data)
    fell = overopt.outcome(data["pointwise"][0])["fell_step"]
    # alarms on iterations 111.. (steps count from 1): the 5th of 10 is at 115
    drop = overopt.outcome(data["pointwise"][0])["gold_drop_step"]
    assert drop is not None and fell < drop < 200  # gold_drop (recomputed from the curves) confirms the fall
    assert f"| pointwise | 0 | {fell} | 111 | 115 | {fell - 115} | 90 of 200 | 111, 115 | drift/latent_norm | {drop} |" in text
    assert f"| pointwise | 1 | {fell} | 21 | none | - | 1 of 200 | 21, none | drift/latent_norm | {drop} |" in text
    assert "| kl_1 | 0 | never | 51 | none | - | 1 of 200 | 51, none | drift/latent_norm | none |" in text
    summary = overopt.table(data)
    assert "| pointwise | 2 |" in summary and "| kl_1 | 1 |" in summary


def test_make_record_reads_gold_alarms_and_evaluations(overopt, tmp_path):
    rows = [{"step": 0, "eval/overall": 0.45},
            {"step": 1, "reward/mean": 0.6, "gold/total": 0.5, "monitor/base_kl": 0.0, "alarm/divergence": 0.0},
            {"step": 2, "reward/mean": 0.7, "gold/total": 0.4, "monitor/base_kl": 1e-4, "alarm/divergence": 1.0},
            {"step": 2, "eval/overall": 0.40}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"wall_seconds": 12.0}))
    rec = overopt.make_record("pointwise", 0, 2, "configs/demo.yaml", [], tmp_path)
    assert rec["curves"] == {"step": [1, 2], "proxy": [0.6, 0.7], "gold": [0.5, 0.4], "base_kl": [0.0, 1e-4],
                             "alarms": [[], ["divergence"]]}
    assert rec["evals"] == [{"step": 0, "overall": 0.45}, {"step": 2, "overall": 0.40}]


def test_alarm_summary_counts_hacked_runs_warnings_and_false_alarms(overopt):
    falling = np.concatenate([np.linspace(0.5, 0.7, 100), np.linspace(0.7, 0.5, 100)])
    dip = np.concatenate([np.full(80, 0.7), np.full(40, 0.6), np.full(80, 0.7)])  # falls 0.1, recovers
    data = {"pointwise": [record(falling, alarms=alarming(200, (100, 200)), seed=0),  # warned
                          record(falling, alarms=alarming(200, (190, 200)), seed=1),  # late
                          record(falling, alarms=alarming(200, (30, 31)), seed=2)],  # a blip long before
            "kl_1": [record(dip, alarms=alarming(200, (100, 110)), seed=0, cond="kl_1"),
                     record(np.full(200, 0.6), alarms=alarming(200, (5, 6)), seed=1, cond="kl_1")]}
    fell = overopt.outcome(data["pointwise"][0])["fell_step"]
    text = overopt.alarm_summary(data)
    assert f"| pointwise | 3 | 3 | 1 | {fell - 105} | 2 | 2 | 0 | 0 | 0 | 3, 0 |" in text
    # a dip that recovers is not hacking; gold_drop fires on it (the proxy kept rising): a false alarm, counted
    assert "| kl_1 | 2 | 0 | 0 | - | 0 | 0 | 2 | 1 | 2 | 0, 1 |" in text


def test_protection_table_compares_with_welch_intervals(overopt):
    from scipy.stats import ttest_ind

    def run(level, seed, cond):
        return record(np.full(60, level), seed=seed, cond=cond)

    data = {"pointwise": [run(x, i, "pointwise") for i, x in enumerate([0.40, 0.42, 0.38])],
            "kl_1": [run(x, i, "kl_1") for i, x in enumerate([0.70, 0.75, 0.80])],
            "pairwise": [run(x, i, "pairwise") for i, x in enumerate([0.35, 0.45, 0.41])],
            "ratio": [run(0.9, 0, "ratio")]}
    d, h = overopt.diff_ci([0.70, 0.75, 0.80], [0.40, 0.42, 0.38])
    assert d == pytest.approx(0.35)
    # the interval excludes zero exactly when Welch's test rejects at 5%
    assert ttest_ind([0.70, 0.75, 0.80], [0.40, 0.42, 0.38], equal_var=False).pvalue < 0.05 and d - h > 0
    p = ttest_ind([0.35, 0.45, 0.41], [0.40, 0.42, 0.38], equal_var=False).pvalue
    d2, h2 = overopt.diff_ci([0.35, 0.45, 0.41], [0.40, 0.42, 0.38])
    assert p > 0.05 and d2 - h2 < 0 < d2 + h2
    text = overopt.protection_table(data)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert "| higher |" in rows["kl_1"] and "| not resolved |" in rows["pairwise"]
    assert "fewer than 2 seeds a side" in rows["ratio"] and "pointwise" not in rows


def test_the_proxy_curve_is_the_proxys_own_score(overopt):
    alone = {"reward/mean": 0.7, "reward/shapes_proxy/mean": 0.7}
    mixed = {"reward/mean": 1.1, "reward/shapes_proxy/mean": 0.8, "reward/adversarial/mean": 0.3}
    pairwise = {"reward/mean": 0.5, "reward/pref_winrate/mean": 0.5, "gold/shapes_proxy": 0.65}
    assert [overopt.proxy_score(r) for r in (alone, mixed, pairwise)] == [0.7, 0.8, 0.65]
    assert overopt.proxy_score({"reward/mean": 0.5, "reward/pref_winrate/mean": 0.5}) is None  # a win rate is no score
    o = overopt.outcome(record(np.full(40, 0.5), proxy=[None] * 40))
    assert o["proxy_rise"] is None and o["gold_end"] == pytest.approx(0.5)

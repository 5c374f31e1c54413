"""DGPO's loss and MixGRPO's sampler on hand-computed cases, and two-iteration runs of each on the
tiny shapes model (the same path as `flowgrpo train`)."""

from __future__ import annotations

import math

import pytest
import torch

from flowgrpo.algorithms.objectives.dgpo import clip_mask, dgpo_loss, group_weights
from flowgrpo.config import ConfigError, load_config
from flowgrpo.runlog import read_metrics
from flowgrpo.sampling import window_start
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import Trainer, train
from helpers import make_cfg


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- DGPO -------------------------------------------------------------------------------------
def test_dgpo_group_weight_and_loss_by_hand():
    """Two groups of two. Group 0: A = (1, -1), Delta = (0.2, 0.1), beta 10, K 2:
    S = (10 * 0.2 - 10 * 0.1) / 2 = 0.5, w = sigmoid(0.5). Group 1: A = (0.5, -0.5),
    Delta = (-0.4, 0.4): S = (-2 - 2) / 2 = -2, w = sigmoid(-2) (preference already met)."""
    delta = torch.tensor([0.2, 0.1, -0.4, 0.4])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    ids = torch.tensor([0, 0, 1, 1])
    w = group_weights(delta, adv, ids, beta=10.0, group_size=2)
    assert w.tolist() == pytest.approx([sigmoid(0.5)] * 2 + [sigmoid(-2.0)] * 2)
    # L = mean_i w A l: by hand with l = (0.3, 0.5, 0.2, 0.1)
    l = torch.tensor([0.3, 0.5, 0.2, 0.1], requires_grad=True)
    per = dgpo_loss(l, w, adv)
    expect = (sigmoid(0.5) * (0.3 - 0.5) + sigmoid(-2.0) * 0.5 * (0.2 - 0.1)) / 4
    assert float(per.mean().detach()) == pytest.approx(expect)
    per.mean().backward()
    # dL/dl_i = w A_i / 4: the preferred image's loss goes down, the rejected one's up
    assert l.grad.tolist() == pytest.approx([sigmoid(0.5) / 4, -sigmoid(0.5) / 4,
                                             sigmoid(-2.0) * 0.125, -sigmoid(-2.0) * 0.125])


def test_dgpo_group_weight_sums_partial_groups_across_processes():
    """A group split over two processes weighs the same as on one: the partial sums are added."""
    delta, adv, ids = torch.tensor([0.2, 0.1, -0.3]), torch.tensor([1.0, -1.0, 0.4]), torch.tensor([0, 0, 0])
    whole = group_weights(delta, adv, ids, 10.0, 3)
    # this process holds two members; the reduce adds the other process's partial sum (its one member)
    split = group_weights(delta[:2], adv[:2], ids[:2], 10.0, 3,
                          reduce=lambda s: s + (adv[2] * 10.0 * delta[2] / 3).double().reshape(1))
    alone = group_weights(delta[:2], adv[:2], ids[:2], 10.0, 3)
    assert torch.allclose(split, whole[:2]) and not torch.allclose(alone, whole[:2])


def test_dgpo_ppo_clip_by_hand():
    """clip 0.1. A > 0 with l_old 0.45, l 0.3: ratio e^0.15 = 1.16 > 1.1, clipped; A < 0 with
    l_old 0.35, l 0.5: e^-0.15 = 0.86 < 0.9, clipped; A > 0 with l_old 0.25, l 0.3: e^-0.05, kept;
    A < 0 with l_old 0.6, l 0.5: e^0.1 = 1.105, kept (only the direction A pushes is clipped)."""
    l = torch.tensor([0.3, 0.5, 0.3, 0.5], requires_grad=True)
    old = torch.tensor([0.45, 0.35, 0.25, 0.6])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    clipped = clip_mask(l, old, adv, 0.1)
    assert clipped.tolist() == [True, True, False, False]
    dgpo_loss(l, torch.ones(4), adv, clipped).sum().backward()
    assert l.grad.tolist() == [0.0, 0.0, 1.0, -1.0]


DGPO = ["optim.policy_loss=dgpo", "sample.kind=dpm2", "optim.train_guidance=1.0", "optim.kl_beta=0.02",
        "optim.dgpo_beta=100", "optim.clip_range=1e-2", "optim.fm_rollout_steps=3", "optim.timestep_count=2",
        "optim.timestep_mode=random", "optim.fm_group_noise=true", "optim.drop_zero_signal=false",
        "optim.dgpo_sample_old_after=0"]


def test_dgpo_two_iterations_and_its_draws(tiny_shapes_model, tmp_path):
    """CFG 2.0 rollouts with dpm2, CFG-free loss, 2 of the first 3 steps, group-shared noise."""
    cfg = make_cfg(tiny_shapes_model, tmp_path / "a", extra=DGPO + ["run.save_every=1"])
    train(cfg)
    rows = [m for m in read_metrics(tmp_path / "a" / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2 and all(m["train/timesteps"] == 2 for m in rows)
    assert all(0 < m["train/dgpo/weight_mean"] < 1 for m in rows)
    assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] > 0  # LoRA B = 0: the base at first
    assert rows[-1]["train/dgpo/old_distance"] > 0
    # the draws: every member of a group shares its noise at each draw, groups differ
    trainer = Trainer(make_cfg(tiny_shapes_model, tmp_path / "b", extra=DGPO))
    batch = trainer.sample(0)
    trainer.score(batch)
    trainer.objective.prepare(batch, 0)
    _, eps = trainer.objective.draws[0]
    g = batch.group_ids
    assert torch.equal(eps[0], eps[1]) and bool((g[0] == g[1]).item())
    assert not torch.equal(eps[0], eps[-1]) and bool((g[0] != g[-1]).item())


def test_dgpo_config_checks():
    with pytest.raises(ConfigError, match="optim.dgpo_beta"):
        validate(load_config(TrainConfig, None, DGPO + ["optim.dgpo_beta=0"]))
    with pytest.raises(ConfigError, match="fm_rollout_steps"):
        validate(load_config(TrainConfig, None, ["optim.fm_rollout_steps=3"]))  # the ratio objective
    with pytest.raises(ConfigError, match="exceeds"):
        validate(load_config(TrainConfig, None, DGPO + ["optim.fm_rollout_steps=30"]))


# ---- MixGRPO ----------------------------------------------------------------------------------
def test_progressive_window_schedule_by_hand():
    """MixGRPO: window starts 0, 0, ..., 1, ... every 25 iterations, up to the last position, then
    back to 0. Flash* (stride 0) keeps the first window."""
    starts = [window_start(it, 0, 19, "progressive", every=25, stride=1) for it in range(0, 600, 25)]
    assert starts == list(range(20)) + [0, 1, 2, 3]
    assert [window_start(it, 0, 19, "progressive", 25, 1) for it in (0, 24, 25, 49, 50)] == [0, 0, 1, 1, 2]
    assert {window_start(it, 0, 19, "progressive", 20, 0) for it in range(500)} == {0}
    assert [window_start(it, 2, 9, "progressive", 1, 3) for it in range(5)] == [2, 5, 8, 2, 5]


MIX = ["sample.kind=flow_sde", "sample.window_size=2", "sample.window_start_range=[0, 1]",
       "sample.window_schedule=progressive", "sample.window_every=1", "optim.timestep_fraction=1.0",
       "sample.num_steps=6"]


@pytest.mark.parametrize("flash", [False, True])
def test_mixgrpo_two_iterations(tiny_shapes_model, tmp_path, flash):
    """The window slides by one step an iteration; Flash runs dpm2 on half the steps after it.
    Ratio exactly 1 on the first inner step: the recomputed log-probs equal the rollout's bit for bit."""
    extra = MIX + (["sample.window_after=dpm2", "sample.window_compress=0.5"] if flash else [])
    cfg = make_cfg(tiny_shapes_model, tmp_path, extra=extra)
    trainer = Trainer(cfg)
    windows = [tuple(trainer.draw_window(it)) for it in range(3)]
    assert windows == [(0, 2), (1, 2), (0, 2)]
    batch = trainer.sample(1)
    # steps 0 (Euler), 1-2 (SDE), then 6 - 3 + 1 = 4 tail points x 0.5 = 2 points = 1 dpm2 step (Flash)
    assert batch.latents.shape[1] - 1 == (3 + 1 if flash else 6)
    assert batch.sde_steps.tolist()[:3] == [False, True, True]
    train(cfg)
    rows = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2 and all(m["train/max_ratio_dev_first"] == 0.0 for m in rows)
    assert all(m["train/timesteps"] == 2 for m in rows)


def test_window_config_checks():
    def bad(extra, match):
        with pytest.raises(ConfigError, match=match):
            validate(load_config(TrainConfig, None, extra))

    bad(["sample.window_schedule=sliding"], "window_schedule")
    bad(["sample.window_after=heun"], "window_after")
    bad(["sample.window_compress=0.5"], "window_compress")  # no window
    bad(["optim.policy_loss=nft", "sample.kind=dpm2", "sample.window_size=2"], "window_size")
    # a deterministic sampler from one noise per group draws one image K times
    bad(["optim.policy_loss=nft", "sample.kind=dpm2", "sample.same_noise_per_group=true"], "same_noise_per_group")

"""The direction of training, not only its arithmetic: a sign slip in an objective, in the
trainer's advantages or in the pairwise reward passes every formula test that checks a
magnitude, so these tests check which way one update moves the model.

For each objective, one optimizer step on a fixed batch of the tiny model with hand-set
advantages (+1 / -1 within every group) must raise the likelihood of the positive samples and
lower that of the negative ones: for the ratio loss the log-prob of the stored SDE transitions,
for the forward-process objectives the flow-matching surrogate -mean (v(x_t) - (eps - x0))^2 at
fixed noise levels and noise, measured before and after the step.
"""

import json

import numpy as np
import pytest
import torch
from helpers import make_cfg

from flowgrpo.algorithms.advantages import group_advantages
from flowgrpo.algorithms.objectives.nft import nft_loss
from flowgrpo.rewards.pairwise import Judge, JudgeResult, WinRateReward
from flowgrpo.runlog import read_metrics
from flowgrpo.sampling import sde_step
from flowgrpo.trainer import Trainer, train

# one optimizer step per update, small enough that a step moves the model to first order
ONE_STEP = ["sample.prompts_per_step=4", "sample.batch_size=16", "optim.train_batch_size=16", "optim.lr=1e-3"]
OBJECTIVE = {
    "ratio": [],
    "awm": ["optim.policy_loss=awm", "sample.kind=ode"],
    "nft": ["optim.policy_loss=nft", "sample.kind=ode", "sample.guidance=1.0", "optim.nft_beta=0.5"],
    "reward_filtered": ["optim.policy_loss=reward_filtered", "sample.kind=ode", "optim.rf_select=above_mean"],
    "supervised": ["optim.policy_loss=supervised", "sample.kind=ode"],
}
PROBE_SIGMAS = (0.3, 0.6, 0.9)


def _trainer_and_batch(name, model, out, extra=()):
    trainer = Trainer(make_cfg(model, out, extra=ONE_STEP + OBJECTIVE[name] + list(extra)))
    batch = trainer.sample(0)
    # +1 / -1 alternating inside every group of 4, so each group has two of each
    adv = torch.tensor([1.0, -1.0] * (len(batch.latents) // 2))
    adv[batch.group_ids % 2 == 1] *= -1
    batch.all_advantages, batch.all_group_ids = adv, batch.group_ids
    return trainer, batch, adv


@torch.no_grad()
def flow_likelihood(trainer, batch, x0) -> torch.Tensor:
    """Per sample: -mean (v(x_t) - (eps - x0))^2 over fixed noise levels and noise (AWM's surrogate)."""
    g = torch.Generator().manual_seed(123)
    total = torch.zeros(len(x0))
    for s in PROBE_SIGMAS:
        eps = torch.randn(x0.shape, generator=g)
        v = trainer.velocity((1 - s) * x0 + s * eps, torch.full((len(x0),), s), batch.cond).float()
        total -= ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    return total / len(PROBE_SIGMAS)


@torch.no_grad()
def transition_log_prob(trainer, batch) -> torch.Tensor:
    """Per sample: the summed log-prob of its stored stochastic transitions under the current policy."""
    s = trainer.cfg.sample
    total = torch.zeros(len(batch.latents))
    for t in torch.nonzero(batch.sde_steps).flatten().tolist():
        v = trainer.velocity(batch.latents[:, t], batch.sigmas[t], batch.cond)
        total += sde_step(v, batch.latents[:, t], batch.sigmas[t], batch.sigmas[t + 1], noise_level=s.noise_level,
                          kind=s.kind, prev_sample=batch.latents[:, t + 1]).log_prob
    return total


def _likelihood_change(name, trainer, batch, adv) -> torch.Tensor:
    if name == "ratio":
        measure = lambda: transition_log_prob(trainer, batch)  # noqa: E731
    else:
        measure = lambda: flow_likelihood(trainer, batch, batch.latents[:, -1])  # noqa: E731
    before = measure()
    trainer.update(batch, adv, 0)
    return measure() - before


@pytest.mark.parametrize("name", ["ratio", "awm", "nft"])
def test_one_step_moves_toward_positive_and_away_from_negative_samples(name, tiny_shapes_model, tmp_path):
    trainer, batch, adv = _trainer_and_batch(name, tiny_shapes_model, tmp_path)
    change = _likelihood_change(name, trainer, batch, adv)
    up, down = float(change[adv > 0].mean()), float(change[adv < 0].mean())
    assert up > 0 > down, (name, up, down)
    assert float((adv * change).sum()) > 0


def test_nft_direction_holds_once_the_policy_has_left_the_old_copy(tiny_shapes_model, tmp_path):
    """With v != v_old the + and - branches differ (and so do their adaptive weights)."""
    trainer, batch, adv = _trainer_and_batch("nft", tiny_shapes_model, tmp_path)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in trainer.named_params.values():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    change = _likelihood_change("nft", trainer, batch, adv)
    assert float(change[adv > 0].mean()) > float(change[adv < 0].mean())
    assert float((adv * change).sum()) > 0


def test_reward_filtered_moves_toward_the_selected_samples(tiny_shapes_model, tmp_path):
    """Only samples above their group's mean are regressed on: they gain more than the rest."""
    trainer, batch, adv = _trainer_and_batch("reward_filtered", tiny_shapes_model, tmp_path)
    change = _likelihood_change("reward_filtered", trainer, batch, adv)
    assert float(change[adv > 0].mean()) > 0
    assert float(change[adv > 0].mean()) > float(change[adv < 0].mean())


def test_supervised_moves_toward_its_renders_whatever_the_advantages(tiny_shapes_model, tmp_path):
    gains, weights = [], []
    for sign in (1.0, -1.0):
        trainer, batch, adv = _trainer_and_batch("supervised", tiny_shapes_model, tmp_path / str(sign))
        trainer.loss_steps(batch, 0)
        targets = trainer.objective.x0.clone()  # the same renders the update regresses on
        before = flow_likelihood(trainer, batch, targets)
        trainer.update(batch, sign * adv, 0)
        gains.append(flow_likelihood(trainer, batch, targets) - before)
        weights.append(torch.cat([p.detach().flatten() for p in trainer.named_params.values()]))
    assert (gains[0] > 0).all()
    assert torch.equal(weights[0], weights[1])  # advantages are ignored


def test_nft_loss_weights_each_branch_by_its_own_error():
    """L = scale (r |x0+ - x0|^2 / w+ + (1 - r) |x0- - x0|^2 / w-) / beta with w+- = mean |x0+- - x0|,
    written out by hand at v != v_old, where the two branches' errors differ."""
    g = torch.Generator().manual_seed(3)
    x0, eps, v_old, v = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(4))
    t, r, beta = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.5]), 0.4
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * eps
    x0_pos = x_t - tt * (beta * v + (1 - beta) * v_old)
    x0_neg = x_t - tt * ((1 + beta) * v_old - beta * v)
    w_pos = (x0_pos - x0).abs().mean(dim=(1, 2, 3))
    w_neg = (x0_neg - x0).abs().mean(dim=(1, 2, 3))
    assert (w_pos - w_neg).abs().min() > 0.05  # the test would not tell the weights apart otherwise
    pos = ((x0_pos - x0) ** 2).mean(dim=(1, 2, 3)) / w_pos
    neg = ((x0_neg - x0) ** 2).mean(dim=(1, 2, 3)) / w_neg
    expected = 5.0 * (r * pos + (1 - r) * neg) / beta
    assert torch.allclose(nft_loss(v, v_old, x_t, x0, t, r, beta, 5.0).float(), expected, rtol=1e-5)


# ---- the trainer's advantages ---------------------------------------------------------------
def _by_hand(rewards: dict[str, list[float]], weights: dict[str, float], ids: list[int], mix: str,
             clip: float = 5.0, eps: float = 1e-4) -> np.ndarray:
    """GRPO advantages written out: (r - group mean) / (group population std + eps), clamped."""
    def normalise(r):
        r, out = np.asarray(r, float), np.zeros(len(r))
        for g in set(ids):
            m = np.asarray(ids) == g
            if np.ptp(r[m]) > 0:
                out[m] = (r[m] - r[m].mean()) / (r[m].std() + eps)
        return np.clip(out, -clip, clip)

    if mix == "advantage":
        return sum(weights[n] * normalise(r) for n, r in rewards.items())
    return normalise(sum(weights[n] * np.asarray(r, float) for n, r in rewards.items()))


@pytest.mark.parametrize("mix", ["reward", "advantage"])
def test_logged_advantages_follow_the_logged_rewards(mix, tiny_shapes_model, tmp_path):
    """Recompute every iteration's advantages from the rewards it logged: the best image of a
    group gets the largest advantage, and the values match the formula."""
    weights = {"jpeg_compressibility": 1.0, "shapes_partial": 0.5}
    train(make_cfg(tiny_shapes_model, tmp_path, extra=["run.dump_advantages=true", f"reward.mix={mix}"]))
    rows = [json.loads(line) for line in (tmp_path / "advantages-rank0.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    metrics = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "reward/mean" in m]
    for row, m in zip(rows, metrics):
        rewards, ids, adv = row["rewards"], row["group_ids"], np.asarray(row["advantages"])
        assert set(rewards) == set(weights)
        np.testing.assert_allclose(adv, _by_hand(rewards, weights, ids, mix), atol=1e-5)
        total = sum(weights[n] * np.asarray(r) for n, r in rewards.items())
        assert m["reward/mean"] == pytest.approx(float(total.mean()))
        if mix == "reward":
            for g in set(ids):
                members = np.flatnonzero(np.asarray(ids) == g)
                assert adv[members].argmax() == total[members].argmax()
                assert adv[members].argmin() == total[members].argmin()


def test_a_higher_reward_gives_a_higher_advantage():
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, _ = group_advantages(torch.tensor([0.1, 0.9, 0.5, 3.0, 1.0, 2.0]), ids)
    assert adv[1] > adv[2] > adv[0] and adv[3] > adv[5] > adv[4]
    assert adv[1] > 0 > adv[0] and adv[3] > 0 > adv[4]


# ---- the pairwise win rate ------------------------------------------------------------------
class ScriptedJudge(Judge):
    """Answers given probabilities for the calls in order, and flags the listed calls failed
    while answering a misleading probability for them (a judge's answer on a failed call
    is whatever it had: the reward must not use it)."""

    name = "scripted"

    def __init__(self, probs, failed=()):
        self.probs, self.failed = np.asarray(probs, float), set(failed)

    def judge(self, prompts, images_a, images_b, metadata=None):
        failed = np.array([i in self.failed for i in range(len(prompts))])
        return JudgeResult(self.probs[:len(prompts)].copy(), failed, {})


def _pair_scores(judge, n=3):
    images = np.zeros((n, 4, 4, 3), np.uint8)
    return WinRateReward(judge)(images, ["p"] * n, group_ids=np.zeros(n, int))


def test_judge_probabilities_outside_0_1_are_clipped():
    # pairs (0,1), (0,2), (1,2); a soft judge overshooting to 1.6 and -0.4 counts as 1 and 0
    out = _pair_scores(ScriptedJudge([1.6, -0.4, 0.5]))
    np.testing.assert_allclose(out.scores, [(1.0 + 0.0) / 2, (0.0 + 0.5) / 2, (1.0 + 0.5) / 2])
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert out.scores.sum() == pytest.approx(1.5)  # G/2: every pair hands out one unit


def test_failed_judge_calls_count_as_ties_whatever_the_judge_answered():
    # call 0 (pair 0 vs 1) failed but the judge still reported 1.0 for it
    out = _pair_scores(ScriptedJudge([1.0, 1.0, 0.0], failed={0}))
    np.testing.assert_allclose(out.scores, [(0.5 + 1.0) / 2, (0.5 + 0.0) / 2, (0.0 + 1.0) / 2])
    assert out.info["failures"] == 1.0

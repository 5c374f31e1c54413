"""Win-rate reward arithmetic, position-bias cancelling, subset mode, and the local judges."""

import numpy as np
import pytest
import torch

from flowgrpo.algorithms.advantages import group_advantages
from flowgrpo.rewards import Reward, RewardError, RewardOutput, make_reward
from flowgrpo.rewards.pairwise import (
    BradleyTerryJudge,
    Judge,
    JudgeResult,
    ShapesJudge,
    WinRateReward,
    available_judges,
    make_judge,
    ring_pairs,
)
from flowgrpo.worlds.shapes.grammar import parse_prompt
from flowgrpo.worlds.shapes.render import render
from flowgrpo.worlds.shapes.verify import score


def tagged(ids, size=4):
    """Tiny images whose pixel (0, 0, 0) carries an id the test judges read back."""
    imgs = np.zeros((len(ids), size, size, 3), dtype=np.uint8)
    imgs[:, 0, 0, 0] = ids
    return imgs


class QualityJudge(Judge):
    """Prefers the higher hidden quality q[id]: hard (1/0/0.5), or soft sigmoid(q_a - q_b);
    `bias` is added to P(first) to model a position-biased judge; `fail` lists (id_a, id_b)
    pairs it cannot answer."""

    def __init__(self, q, soft=False, bias=0.0, fail=()):
        self.q, self.soft, self.bias, self.fail = np.asarray(q, float), soft, bias, set(fail)
        self.calls = []

    def judge(self, prompts, images_a, images_b, metadata=None):
        ia, ib = images_a[:, 0, 0, 0].astype(int), images_b[:, 0, 0, 0].astype(int)
        self.calls += list(zip(ia.tolist(), ib.tolist()))
        d = self.q[ia] - self.q[ib]
        p = 1 / (1 + np.exp(-d)) if self.soft else np.sign(d) * 0.5 + 0.5
        p = np.clip(p + self.bias, 0, 1)
        failed = np.array([(a, b) in self.fail for a, b in zip(ia, ib)], dtype=bool)
        return JudgeResult(np.where(failed, 0.5, p), failed)


class FirstJudge(Judge):
    """Always prefers the image shown first: pure position bias."""

    def judge(self, prompts, images_a, images_b, metadata=None):
        return JudgeResult(np.ones(len(prompts)), np.zeros(len(prompts), dtype=bool))


def test_win_rates_sum_to_half_the_group_size():
    rng = np.random.default_rng(0)
    sizes = [2, 3, 5, 8]
    gids = np.concatenate([np.full(g, k) for k, g in enumerate(sizes)])
    order = rng.permutation(len(gids))  # groups interleaved in the batch, as after a gather
    gids = gids[order]
    n = len(gids)
    judge = QualityJudge(rng.normal(size=n), soft=True)
    prompts = [f"prompt {g}" for g in gids]
    out = WinRateReward(judge)(tagged(np.arange(n)), prompts, group_ids=torch.as_tensor(gids))
    for k, g in enumerate(sizes):
        m = gids == k
        assert out.scores[m].sum() == pytest.approx(g / 2)
        assert np.all(out.components["comparisons"][m] == g - 1)
    assert out.info["judge_calls"] == sum(g * (g - 1) // 2 for g in sizes)
    assert out.info["failures"] == 0
    # Only pairs inside a group were judged.
    assert all(gids[a] == gids[b] for a, b in judge.calls)


def test_design_example_win_rates_and_their_advantages():
    # Hidden qualities whose ranks give DESIGN.md's win rates [0, 2/3, 1, 1/3].
    out = WinRateReward(QualityJudge([0, 2, 3, 1]))(tagged(range(4)), ["p"] * 4, group_ids=np.zeros(4))
    np.testing.assert_allclose(out.scores, [0, 2 / 3, 1, 1 / 3])
    assert out.info["ties"] == 0 and out.info["judge_calls"] == 6
    g = torch.zeros(4, dtype=torch.long)
    adv, stats = group_advantages(torch.tensor(out.scores), g)
    np.testing.assert_allclose(adv.numpy(), [-np.sqrt(1.8), np.sqrt(0.2), np.sqrt(1.8), -np.sqrt(0.2)], atol=1e-3)
    # DESIGN.md quotes the paper's numbers, computed from the rounded rates (and no epsilon).
    adv_paper, _ = group_advantages(torch.tensor([0, 0.67, 1, 0.33]), g, eps=1e-12)
    np.testing.assert_allclose(adv_paper.numpy(), [-1.34, 0.46, 1.34, -0.46], atol=0.006)
    adv_point, st_point = group_advantages(torch.tensor([0.3457, 0.3530, 0.3496, 0.3494], dtype=torch.float64), g,
                                           eps=1e-12)
    np.testing.assert_allclose(adv_point.numpy(), [-1.44, 1.39, 0.07, -0.01], atol=0.006)
    # The "illusory advantage": unit-spread advantages from a 0.0026 reward spread.
    assert st_point.reward_std == pytest.approx(0.0026, abs=1e-4)
    assert stats.reward_std == pytest.approx(0.3727, abs=1e-4)


def test_both_orders_cancels_a_judge_that_always_prefers_the_first_image():
    imgs, prompts, g = tagged(range(4)), ["p"] * 4, np.zeros(4)
    one = WinRateReward(FirstJudge())(imgs, prompts, group_ids=g)
    np.testing.assert_allclose(one.scores, [1, 2 / 3, 1 / 3, 0])  # pure position noise
    assert one.info["first_wins_share"] == 1.0
    both = WinRateReward(FirstJudge(), both_orders=True)(imgs, prompts, group_ids=g)
    np.testing.assert_allclose(both.scores, 0.5)
    assert both.info["judge_calls"] == 12 and both.info["pairs"] == 6
    assert both.info["first_wins_share"] == 1.0 and both.info["order_disagreements"] == 6
    adv, stats = group_advantages(torch.tensor(both.scores), torch.zeros(4, dtype=torch.long))
    assert stats.zero_signal_groups == 1 and torch.all(adv == 0)


def test_both_orders_recovers_the_unbiased_preferences_of_a_biased_judge():
    q = [0.0, 0.6, 0.3, 0.9, 0.15]
    imgs, prompts, g = tagged(range(5)), ["p"] * 5, np.zeros(5)
    truth = WinRateReward(QualityJudge(q, soft=True))(imgs, prompts, group_ids=g).scores
    biased = QualityJudge(q, soft=True, bias=0.08)
    one = WinRateReward(biased)(imgs, prompts, group_ids=g)
    both = WinRateReward(biased, both_orders=True)(imgs, prompts, group_ids=g)
    assert np.abs(one.scores - truth).max() > 0.05
    np.testing.assert_allclose(both.scores, truth, atol=1e-12)
    assert both.info["first_wins_share"] > 0.5  # the bias is visible in the log even when cancelled


def test_failures_and_ties_count_half_and_are_logged():
    judge = QualityJudge([0, 1, 2, 2], fail=[(0, 1)])
    out = WinRateReward(judge)(tagged(range(4)), ["p"] * 4, group_ids=np.zeros(4))
    # pairs: (0,1) failed -> 0.5; 0 loses the rest; 1 loses to 2 and 3; 2 vs 3 tie.
    np.testing.assert_allclose(out.scores, [0.5 / 3, 0.5 / 3, 2.5 / 3, 2.5 / 3])
    assert out.scores.sum() == pytest.approx(2)
    assert out.info["failures"] == 1 and out.info["failure_rate"] == pytest.approx(1 / 6)
    assert out.info["ties"] == 1
    assert out.info["first_wins_share"] == 0.0  # every decided pair had the better image second


def test_subset_mode_is_regular_reproducible_and_cheaper():
    imgs, prompts, g = tagged(range(8)), ["p"] * 8, np.zeros(8)
    judge = QualityJudge(np.arange(8))
    out = WinRateReward(judge, pairs_per_image=3, seed=1)(imgs, prompts, group_ids=g)
    assert out.info["judge_calls"] == 12  # G k / 2 instead of 28
    assert np.all(out.components["comparisons"] == 3)
    assert out.scores.sum() == pytest.approx(4)  # k-regular: still G/2
    again = WinRateReward(judge, pairs_per_image=3, seed=1)(imgs, prompts, group_ids=g)
    np.testing.assert_array_equal(out.scores, again.scores)
    plans = {frozenset(map(frozenset, WinRateReward(judge, pairs_per_image=3, seed=s).plan(np.arange(8), imgs)))
             for s in range(10)}
    assert len(plans) > 5
    # Odd group and odd k: no 3-regular graph on 7 nodes, so 4 opponents each.
    odd = WinRateReward(judge, pairs_per_image=3)(imgs[:7], prompts[:7], group_ids=g[:7])
    assert np.all(odd.components["comparisons"] == 4) and odd.info["judge_calls"] == 14
    # k >= G - 1 is the full round robin.
    full = WinRateReward(judge, pairs_per_image=10)(imgs, prompts, group_ids=g)
    assert full.info["judge_calls"] == 28
    for size, k in [(8, 3), (9, 4), (10, 5), (24, 6), (5, 2)]:
        pairs = ring_pairs(size, k, np.random.default_rng(0))
        assert len({frozenset(p) for p in pairs}) == len(pairs) == size * k // 2
        assert all(a != b for a, b in pairs)


def test_subset_estimate_is_unbiased_with_the_documented_variance():
    G, k, trials = 8, 3, 400
    imgs, prompts, g = tagged(range(G)), ["p"] * G, np.zeros(G)
    judge = QualityJudge(np.arange(G))
    runs = np.stack([WinRateReward(judge, pairs_per_image=k, seed=s)(imgs, prompts, group_ids=g).scores
                     for s in range(trials)])
    w = np.arange(G) / (G - 1)  # all-pairs win rates of a transitive hard judge
    s2 = w * (1 - w)
    predicted = s2 / k * (G - 1 - k) / (G - 2)
    se = np.sqrt(predicted / trials)
    assert np.all(np.abs(runs.mean(0) - w) <= 4 * se + 1e-12)
    inner = slice(1, G - 1)  # the best and worst image always win / lose: zero variance
    np.testing.assert_allclose(runs.var(0)[[0, G - 1]], 0)
    ratio = runs.var(0)[inner].sum() / predicted[inner].sum()
    assert 0.8 < ratio < 1.2


def test_shapes_judge_prefers_the_image_that_satisfies_the_prompt():
    rec = parse_prompt("a photo of a red square")
    wrong = parse_prompt("a photo of a green circle")
    good, bad = render(rec, 0), render(wrong, 0)
    assert score(good, rec).partial > score(bad, rec).partial
    judge = make_judge("shapes")
    res = judge.judge([rec["prompt"]] * 3, np.stack([good, bad, good]), np.stack([bad, good, good]))
    np.testing.assert_array_equal(res.probs, [1.0, 0.0, 0.5])
    assert not res.failed.any()
    # As a reward over a group of two right and two wrong images; metadata records are used when given.
    imgs = np.stack([good, bad, render(rec, 1), render(wrong, 1)])
    reward = make_reward("pref_winrate", judge="shapes")
    assert reward.kind == "pairwise" and reward.needs_groups
    out = reward(imgs, [rec["prompt"]] * 4, metadata=[rec] * 4, group_ids=np.zeros(4))
    np.testing.assert_allclose(out.scores, [5 / 6, 1 / 6, 5 / 6, 1 / 6])
    assert out.info["ties"] == 2


class Brightness(Reward):
    name = "brightness"

    def __init__(self):
        self.scored = 0

    def __call__(self, images, prompts, metadata=None, group_ids=None):
        self.scored += len(images)
        s = images.reshape(len(images), -1).mean(1) / 255.0
        s = np.where(images[:, 0, 0, 1] == 7, np.nan, s)  # a marked image the reward cannot score
        return RewardOutput(s)


def test_bradley_terry_judge_probabilities_and_scoring_once_per_image():
    imgs = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 51, 102, 255)])
    reward = Brightness()
    judge = BradleyTerryJudge(reward, tau=0.1)
    out = WinRateReward(judge)(imgs, ["p"] * 4, group_ids=np.zeros(4))
    assert reward.scored == 4  # 6 pairs, 4 distinct images
    s = np.array([0, 0.2, 0.4, 1.0])
    p = 1 / (1 + np.exp(-(s[:, None] - s[None, :]) / 0.1))
    expected = (p.sum(1) - 0.5) / 3
    np.testing.assert_allclose(out.scores, expected)
    hard = BradleyTerryJudge(Brightness(), tau=0).judge(["p"] * 2, imgs[[0, 3]], imgs[[3, 3]])
    np.testing.assert_array_equal(hard.probs, [0.0, 0.5])
    marked = imgs.copy()
    marked[1, 0, 0, 1] = 7
    res = judge.judge(["p"] * 2, marked[[0, 2]], marked[[1, 3]])
    np.testing.assert_array_equal(res.failed, [True, False])
    assert res.probs[0] == 0.5


def test_bradley_terry_by_name_and_argument_errors():
    assert {"shapes", "bradley_terry", "vlm"} <= set(available_judges())
    r = make_reward("pref_winrate", judge="bradley_terry", judge_args={"reward": "shapes_partial", "tau": 0.05})
    assert isinstance(r, WinRateReward) and r.judge.tau == 0.05
    with pytest.raises(RewardError, match="needs reward=NAME"):
        make_reward("pref_winrate", judge="bradley_terry")
    with pytest.raises(RewardError, match="unknown judge"):
        make_reward("pref_winrate", judge="nope")
    with pytest.raises(RewardError, match="pointwise"):
        BradleyTerryJudge(make_reward("pref_winrate"))
    with pytest.raises(RewardError, match="tau"):
        BradleyTerryJudge("shapes_partial", tau=-1)
    with pytest.raises(RewardError, match="pairs_per_image"):
        make_reward("pref_winrate", pairs_per_image=0)
    with pytest.raises(RewardError, match="mixes prompts"):
        make_reward("pref_winrate")(tagged(range(2), 32), ["a photo of a square", "a photo of a circle"],
                                    group_ids=np.zeros(2))


def test_group_ids_default_to_prompts_and_singletons_get_half():
    judge = QualityJudge([0, 1, 5])
    out = WinRateReward(judge)(tagged(range(3)), ["a", "a", "b"])
    np.testing.assert_allclose(out.scores, [0, 1, 0.5])
    assert out.info["judge_calls"] == 1
    assert isinstance(ShapesJudge(), Judge)


def test_sampling_bradley_terry_judge_answers_verdicts_drawn_with_its_probability():
    """sample=True: each pair gets a 0/1 verdict, drawn with P = sigmoid(gap / tau), repeatable
    for the same images (resume), independent across pairs (many pairs match P)."""
    rng = np.random.default_rng(0)
    n = 4000
    a = rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    a[:, 0, 0, :] = 102  # brightness 0.4 ...
    b = a.copy()
    b[:, 0, 0, :] = 100  # ... against a hair darker: a near-tie
    soft = BradleyTerryJudge(Brightness(), tau=0.05).judge(["p"] * n, a, b)
    drawn = BradleyTerryJudge(Brightness(), tau=0.05, sample=True, seed=3).judge(["p"] * n, a, b)
    assert set(np.unique(drawn.probs)) == {0.0, 1.0}
    p = soft.probs.mean()
    assert 0.5 < p < 0.6 and abs(drawn.probs.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    again = BradleyTerryJudge(Brightness(), tau=0.05, sample=True, seed=3).judge(["p"] * n, a, b)
    np.testing.assert_array_equal(again.probs, drawn.probs)
    other = BradleyTerryJudge(Brightness(), tau=0.05, sample=True, seed=4).judge(["p"] * n, a, b)
    assert (other.probs != drawn.probs).any()
    # a clear gap is (almost surely) always won; the option is reachable by name
    clear = make_judge("bradley_terry", reward="shapes_partial", tau=0.05, sample=True)
    assert clear.sample and clear.seed == 0
    far = BradleyTerryJudge(Brightness(), tau=0.05, sample=True).judge(["p"] * 64, np.full((64, 2, 2, 3), 255, np.uint8),
                                                                      np.zeros((64, 2, 2, 3), np.uint8))
    assert far.probs.min() == 1.0

"""Pref-GRPO's pairwise preference reward: each image's win rate against its own group.

A **judge** answers, for a batch of pairs (prompt, image a, image b), the probability that a
is preferred: 1 / 0 / 0.5 for hard judges (a VLM verdict, a verifier comparison), anything in
[0, 1] for soft ones (Bradley-Terry over a pointwise score). A judge also flags the calls it
could not answer; those count as ties, never as exceptions.

**Win rate.** For a group of G images of one prompt, the pairs E (all G(G-1)/2 unordered
pairs by default) are judged and

    p_ij = P(i > j)                                  (one order: i shown first)
    p_ij = ( P(i > j | i first) + 1 - P(j > i | j first) ) / 2    (both_orders)
    r_i  = (1 / deg_i) * sum_{j : (i,j) in E} p_ij               with p_ji = 1 - p_ij

Failed calls and ties count p = 0.5. Because every judged pair hands out exactly one unit of
preference, sum_i deg_i r_i = |E|; with all pairs (deg_i = G - 1) the win rates sum to G/2 and
the group mean is 0.5, so the group-normalised advantage only sees the spread of wins. The
reference judges each pair once with a fixed order, so a judge that favours the first image
adds position noise; both_orders doubles the calls and cancels a constant position bias
exactly (a judge that always says "first" gives p_ij = 0.5 for every pair).

**Subset mode** (`pairs_per_image = k < G - 1`) for large groups: the group is put on a ring
in a random order and each image meets its k nearest ring neighbours (offsets 1..k/2 both
ways, plus the opposite image when k is odd). The comparison graph is k-regular, so the win
rates still sum to G/2, and each image's opponent set is marginally a uniform random k-subset
of the other G - 1 images. Write w_i for the all-pairs win rate and s_i^2 = mean_j (p_ij -
w_i)^2 for the spread of image i's match-ups (at most w_i (1 - w_i) <= 1/4 for a hard judge).
The subset estimate is unbiased, E[r_i] = w_i, with the finite-population variance

    Var(r_i) = s_i^2 / k * (G - 1 - k) / (G - 2)

(zero at k = G - 1), on top of the judge's own noise, which is averaged over k comparisons
instead of G - 1. Cost: G k / 2 calls per group instead of G (G - 1) / 2 (G = 24, k = 6:
72 calls instead of 276, at Var <= 0.032 per image). When G and k are both odd no k-regular
graph exists and k + 1 opponents are used. The ring order comes from a generator seeded by
(seed, a hash of the group's images), so it is reproducible across processes and resumes
without extra state, and differs from step to step as the images do.

Registered as `make_reward("pref_winrate", judge="shapes", judge_args={...},
both_orders=False, pairs_per_image=None, seed=0)`. Judges are made by name with
`make_judge`: "shapes", "bradley_terry" (over any registered pointwise reward) and "vlm"
(UnifiedReward-Think over an OpenAI-compatible server, see vlm_judge.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

from .base import Reward, RewardError, RewardOutput, as_uint8_images, make_reward, register


@dataclass
class JudgeResult:
    probs: np.ndarray  # (N,) P(first image preferred); 0.5 where the call failed
    failed: np.ndarray  # (N,) bool: the judge could not answer this pair
    info: dict[str, float] = field(default_factory=dict)  # judge-specific counters


class Judge:
    """Compares pairs of images for their prompts; see the module docstring."""

    name: str = "judge"
    hard: bool = False  # answers only 0, 0.5 or 1
    concurrent_calls: int = 1  # judge() calls that may run at once (thread-safe judges only)

    def judge(self, prompts: list[str], images_a: np.ndarray, images_b: np.ndarray,
              metadata: list[dict | None] | None = None) -> JudgeResult:
        raise NotImplementedError


def failed_result(n: int, info: dict[str, float] | None = None) -> JudgeResult:
    return JudgeResult(np.full(n, 0.5), np.ones(n, dtype=bool), info or {})


def _image_key(prompt: str, image: np.ndarray, meta: dict | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(prompt.encode())
    h.update(json.dumps(meta, sort_keys=True, default=str).encode() if meta else b"")
    h.update(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


class BradleyTerryJudge(Judge):
    """P(a > b) = sigmoid((s_a - s_b) / tau) from a pointwise reward s.

    tau = 0 is the hard limit: 1 if s_a > s_b, 0 if s_a < s_b, 0.5 on equal scores. Each
    distinct (prompt, image) is scored once per call, so judging all pairs of a group costs G
    reward evaluations, not G (G - 1). A NaN score marks every pair it is in as failed.

    sample=True answers each pair with a drawn verdict (1 or 0 with probability P) instead of
    P itself, as a VLM judge answers one token: a near-tie then comes out as a coin flip, not
    as a consistent small preference. The draw is seeded by `seed` and the two images' bytes,
    so it repeats exactly on resume.
    """

    def __init__(self, pointwise_reward: Reward | str, tau: float = 0.1, reward_args: dict | None = None,
                 sample: bool = False, seed: int = 0):
        if isinstance(pointwise_reward, str):
            pointwise_reward = make_reward(pointwise_reward, **(reward_args or {}))
        if getattr(pointwise_reward, "needs_groups", False):
            raise RewardError(f"bradley_terry needs a pointwise reward; {pointwise_reward.name!r} is "
                              f"{pointwise_reward.kind} (it scores whole groups)")
        if not tau >= 0:
            raise RewardError(f"bradley_terry tau must be >= 0 (0 = hard comparison), got {tau}")
        self.reward = pointwise_reward
        self.concurrent_calls = pointwise_reward.concurrent_calls
        self.tau = float(tau)
        self.hard = self.tau == 0
        self.sample, self.seed = bool(sample), int(seed)
        self.name = f"bradley_terry({pointwise_reward.name})"

    def scores(self, prompts, images, metadata) -> np.ndarray:
        keys = [_image_key(p, im, m) for p, im, m in zip(prompts, images, metadata)]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        uniq = list(first.values())
        meta_u = [metadata[i] for i in uniq]
        out = self.reward(images[uniq], [prompts[i] for i in uniq],
                          meta_u if any(m is not None for m in meta_u) else None)
        s = np.asarray(out.scores, dtype=np.float64)
        by_key = {keys[i]: s[n] for n, i in enumerate(uniq)}
        return np.array([by_key[k] for k in keys])

    def judge(self, prompts, images_a, images_b, metadata=None) -> JudgeResult:
        n = len(prompts)
        images_a, images_b = as_uint8_images(images_a), as_uint8_images(images_b)
        metadata = list(metadata) if metadata is not None else [None] * n
        # Pairs may differ in size (serve-judge gets two arbitrary images): score each side on its own.
        if images_a.shape[1:] == images_b.shape[1:]:
            s = self.scores(list(prompts) * 2, np.concatenate([images_a, images_b]), metadata * 2)
            sa, sb = s[:n], s[n:]
        else:
            sa = self.scores(list(prompts), images_a, metadata)
            sb = self.scores(list(prompts), images_b, metadata)
        failed = ~(np.isfinite(sa) & np.isfinite(sb))
        d = np.where(failed, 0.0, sa - sb)
        probs = np.sign(d) * 0.5 + 0.5 if self.hard else expit(d / self.tau)
        if self.sample and n:
            digest = hashlib.blake2b(np.ascontiguousarray(images_a).tobytes()
                                     + np.ascontiguousarray(images_b).tobytes(), digest_size=8).digest()
            draws = np.random.default_rng([self.seed, int.from_bytes(digest, "little")]).random(n)
            probs = (draws < probs).astype(np.float64)
        probs = np.where(failed, 0.5, probs)
        return JudgeResult(probs, failed, {"score_failures": float((~np.isfinite(np.r_[sa, sb])).sum())})


class ShapesJudge(BradleyTerryJudge):
    """The shapes world's judge: prefers the image that passes more of the prompt's checks
    (verifier partial credit, or strict 0/1); equal scores are a tie (0.5)."""

    def __init__(self, mode: str = "partial"):
        from .shapes import ShapesVerifierReward

        try:
            reward = ShapesVerifierReward(mode)
        except ValueError as exc:
            raise RewardError(f"shapes judge: {exc}") from None
        super().__init__(reward, tau=0.0)
        self.name = f"shapes_{mode}"


_JUDGES: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str):
    def deco(factory):
        _JUDGES[name] = factory
        return factory
    return deco


def _import_judges() -> None:
    from . import shapes_proxy, vlm_judge  # noqa: F401  (register "shapes_proxy" and "vlm")


def available_judges() -> list[str]:
    _import_judges()
    return sorted(_JUDGES)


def make_judge(name: str, **kwargs) -> Judge:
    _import_judges()
    if name not in _JUDGES:
        raise RewardError(f"unknown judge {name!r}; available: {', '.join(sorted(_JUDGES))}")
    try:
        return _JUDGES[name](**kwargs)
    except TypeError as exc:
        raise RewardError(f"bad arguments for judge {name!r}: {exc}") from None


@register_judge("shapes")
def _shapes_judge(mode: str = "partial"):
    return ShapesJudge(mode)


@register_judge("bradley_terry")
def _bt_judge(reward: str | None = None, tau: float = 0.1, reward_args: dict | None = None, sample: bool = False,
              seed: int = 0):
    if not reward:
        raise RewardError("judge 'bradley_terry' needs reward=NAME, the pointwise reward it compares "
                          "(e.g. judge_args={'reward': 'shapes_partial', 'tau': 0.1})")
    return BradleyTerryJudge(reward, tau=tau, reward_args=reward_args, sample=sample, seed=seed)


def _as_numpy_ids(group_ids, prompts: list[str]) -> np.ndarray:
    if group_ids is None:
        ids: dict[str, int] = {}
        return np.array([ids.setdefault(p, len(ids)) for p in prompts])
    if hasattr(group_ids, "detach"):
        group_ids = group_ids.detach().cpu().numpy()
    return np.asarray(group_ids).reshape(-1)


def ring_pairs(size: int, k: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A random k-regular comparison graph on `size` nodes (k + 1 when both are odd), as
    ordered pairs (shown first, shown second); see "Subset mode" in the module docstring."""
    if k % 2 and size % 2:
        k += 1
    perm = rng.permutation(size)
    pairs = [(int(perm[s]), int(perm[(s + d) % size])) for d in range(1, k // 2 + 1) for s in range(size)]
    if k % 2:
        pairs += [(int(perm[s]), int(perm[s + size // 2])) for s in range(size // 2)]
    return pairs


class WinRateReward(Reward):
    """Win rate of each image within its group under a pairwise judge (module docstring).

    info (per call): judge_calls, pairs, failures, failure_rate, ties (answered calls with
    p = 0.5), first_wins_share (among answered, decided calls, the share where the first
    image won: 0.5 for a judge without position bias; NaN when no call was decided),
    order_disagreements (both_orders: pairs whose two orders contradict each other, both
    preferring the image in the same position), winrate_std (mean within-group std of the
    win rates), judge_seconds (wall time of the judge call), and the judge's own counters
    prefixed "judge_". components: win_rate, comparisons (judged pairs per image).
    """

    kind = "pairwise"
    needs_groups = True
    mean_info = ("failure_rate", "first_wins_share", "winrate_std")

    def __init__(self, judge: Judge, both_orders: bool = False, pairs_per_image: int | None = None,
                 seed: int = 0, name: str = "pref_winrate"):
        if not isinstance(judge, Judge):
            raise RewardError(f"WinRateReward needs a Judge, got {type(judge).__name__}")
        if pairs_per_image is not None and int(pairs_per_image) < 1:
            raise RewardError(f"pairs_per_image must be >= 1 (or null for all pairs), got {pairs_per_image}")
        self.judge = judge
        self.concurrent_calls = judge.concurrent_calls
        self.both_orders = bool(both_orders)
        self.pairs_per_image = None if pairs_per_image is None else int(pairs_per_image)
        self.seed = int(seed)
        self.name = name

    def plan(self, idx: np.ndarray, images: np.ndarray) -> list[tuple[int, int]]:
        """Ordered pairs (global indices) to judge for one group."""
        g, k = len(idx), self.pairs_per_image
        if k is None or k >= g - 1:
            return [(int(idx[a]), int(idx[b])) for a, b in itertools.combinations(range(g), 2)]
        digest = hashlib.blake2b(np.ascontiguousarray(images[idx]).tobytes(), digest_size=8).digest()
        rng = np.random.default_rng([self.seed, int.from_bytes(digest, "little")])
        return [(int(idx[a]), int(idx[b])) for a, b in ring_pairs(g, k, rng)]

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        images = as_uint8_images(images)
        prompts = list(prompts)
        n = len(images)
        if len(prompts) != n:
            raise RewardError(f"pref_winrate got {n} images but {len(prompts)} prompts")
        gids = _as_numpy_ids(group_ids, prompts)
        if len(gids) != n:
            raise RewardError(f"pref_winrate got {n} images but {len(gids)} group ids")

        pairs: list[tuple[int, int]] = []
        groups = []
        for g in dict.fromkeys(gids.tolist()):
            idx = np.flatnonzero(gids == g)
            if len({prompts[i] for i in idx}) > 1:
                raise RewardError(f"group {g} mixes prompts; a pairwise judge compares images of one prompt "
                                  "(group ids must follow the prompts)")
            groups.append(idx)
            pairs += self.plan(idx, images)

        calls = pairs + ([(j, i) for i, j in pairs] if self.both_orders else [])
        if calls:
            a, b = np.array([c[0] for c in calls]), np.array([c[1] for c in calls])
            meta = [metadata[i] for i in a] if metadata is not None else None
            t0 = time.perf_counter()
            res = self.judge.judge([prompts[i] for i in a], images[a], images[b], meta)
            seconds = time.perf_counter() - t0
            probs = np.asarray(res.probs, dtype=np.float64).reshape(-1)
            failed = np.asarray(res.failed, dtype=bool).reshape(-1)
            if probs.shape != (len(calls),) or failed.shape != (len(calls),):
                raise RewardError(f"judge {self.judge.name!r} answered {probs.shape} for {len(calls)} pairs")
            probs = np.where(failed, 0.5, np.clip(probs, 0.0, 1.0))
            judge_info = res.info
        else:
            probs, failed, judge_info, seconds = np.zeros(0), np.zeros(0, dtype=bool), {}, 0.0

        m = len(pairs)
        pref = probs[:m] if not self.both_orders else 0.5 * (probs[:m] + 1.0 - probs[m:])
        wins, count = np.zeros(n), np.zeros(n)
        for (i, j), p in zip(pairs, pref):
            wins[i] += p
            wins[j] += 1.0 - p
            count[i] += 1
            count[j] += 1
        scores = np.where(count > 0, wins / np.maximum(count, 1), 0.5)

        answered = ~failed
        decided = answered & (probs != 0.5)
        info = {
            "judge_calls": float(len(calls)),
            "pairs": float(m),
            "failures": float(failed.sum()),
            "failure_rate": float(failed.mean()) if len(calls) else 0.0,
            "ties": float((answered & (probs == 0.5)).sum()),
            "first_wins_share": float((probs[decided] > 0.5).mean()) if decided.any() else float("nan"),
            "winrate_std": float(np.mean([scores[idx].std() for idx in groups])) if groups else 0.0,
            "judge_seconds": seconds,
        }
        if self.both_orders:
            both_first = decided[:m] & decided[m:] & (probs[:m] > 0.5) & (probs[m:] > 0.5)
            both_second = decided[:m] & decided[m:] & (probs[:m] < 0.5) & (probs[m:] < 0.5)
            info["order_disagreements"] = float((both_first | both_second).sum())
        info.update({f"judge_{k}": float(v) for k, v in judge_info.items()})
        return RewardOutput(scores, {"win_rate": scores, "comparisons": count}, info)


@register("pref_winrate")
def _pref_winrate(judge: str | Judge = "shapes", judge_args: dict | None = None, both_orders: bool = False,
                  pairs_per_image: int | None = None, seed: int = 0):
    if not isinstance(judge, Judge):
        judge = make_judge(judge, **(judge_args or {}))
    return WinRateReward(judge, both_orders=both_orders, pairs_per_image=pairs_per_image, seed=seed)

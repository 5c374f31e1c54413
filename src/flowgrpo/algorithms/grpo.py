"""The GRPO policy loss for one trained timestep, its KL term, RatioNorm, timestep selection and EMA.

Per timestep t of a stored trajectory (x_t -> x_{t+1}, old log-prob, advantage A):
    ratio = exp(logp_theta - logp_old)
    L     = mean( max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps)) ) + beta KL
    KL    = mean_batch mean_CHW (mu_theta - mu_ref)^2 / (2 std_t^2)
On the first inner step theta = theta_old, so ratio must be exactly 1: the trainer logs
max|ratio - 1| to catch rollouts and updates that compute differently.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class LossStats:
    policy_loss: float
    kl: float
    clip_fraction: float
    approx_kl: float
    max_ratio_dev: float


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL between the Gaussian steps of the policy and the reference (same std):
    mean over C, H, W of (mu - mu_ref)^2 / (2 std^2). Average it over the batch."""
    dims = tuple(range(1, mean.ndim))
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=dims)


def _mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return x.mean()
    return (x * weights).sum() / weights.sum().clamp(min=1.0)


def ratio_norm_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor,
                         old_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RatioNorm (Pref-GRPO's newer code), per sample:
        (logp - logp_old + mean_CHW (mu - mu_old)^2 / (2 std^2)) * std
    With x' = mu_old + std eps and Gaussian log-probs averaged over C, H, W this is
    mean_CHW eps (mu - mu_old): the quadratic term cancels and the 1/std scale goes, so the
    log-ratio no longer grows as the step's std shrinks. Samples with std 0 score 0."""
    std = std.reshape(-1).to(log_prob.dtype)
    dims = tuple(range(1, mean.ndim))
    sq = ((mean.float() - old_mean.float()) ** 2).mean(dim=dims)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    out = (log_prob - old_log_prob + sq / (2 * safe**2)) * safe
    return torch.where(std > 0, out, torch.zeros_like(out))


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              kl: torch.Tensor | None = None, kl_beta: float = 0.0, weights: torch.Tensor | None = None,
              sample_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """`kl` is per sample (kl_to_reference); `weights` (0/1 per sample) masks padding
    samples that only keep distributed processes in step; `sample_scale` multiplies each
    sample's clipped term (RatioNorm: 1 / |dt|). The ratio is exp(log_prob - old_log_prob)."""
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if sample_scale is not None:
        per_sample = per_sample * sample_scale
    policy_loss = _mean(per_sample, weights)
    kl_mean = _mean(kl, weights) if kl is not None else None
    loss = policy_loss + (kl_beta * kl_mean if kl_mean is not None and kl_beta else 0.0)
    with torch.no_grad():
        real = weights > 0 if weights is not None else torch.ones_like(ratio, dtype=torch.bool)
        dev = (ratio - 1).abs()[real]
        stats = LossStats(
            policy_loss=float(policy_loss),
            kl=float(kl_mean) if kl_mean is not None else 0.0,
            clip_fraction=float((dev > clip_range).float().mean()) if dev.numel() else 0.0,
            approx_kl=float(0.5 * (diff[real] ** 2).mean()) if dev.numel() else 0.0,
            max_ratio_dev=float(dev.max()) if dev.numel() else 0.0,
        )
    return loss, stats


def candidate_steps(sde_steps: torch.Tensor, exclude_last: bool = False) -> list[int]:
    """The trainable transitions: the stochastic ones, without the sampler's last step
    (index N - 1, the step into sigma 0) when `exclude_last`."""
    steps = torch.nonzero(sde_steps).flatten().tolist()
    if exclude_last and steps:
        steps = [s for s in steps if s != len(sde_steps) - 1]
        if not steps:
            raise ValueError("no step to train: the only stochastic step is the last one (timestep_exclude_last)")
    return steps


def select_timesteps(sde_steps: torch.Tensor, mode: str, fraction: float, generator: torch.Generator | None = None,
                     exclude_last: bool = False, count: int | None = None) -> list[int]:
    """Which stochastic transitions to train on (the same for every sample).

    "first": the first int(n * fraction) of them (0.99 of 10 -> 9: the last, nearly clean,
    step is skipped, as in Flow-GRPO). "random": a random int(n * fraction) of them, drawn
    from `generator` (Pref-GRPO trains a random 60%); seed it identically on every process.
    n counts the candidates (candidate_steps), so `exclude_last` takes the fraction of the rest;
    `count` (at most the candidates) replaces int(n * fraction).
    """
    steps = candidate_steps(sde_steps, exclude_last)
    n = _subset_size(len(steps), fraction, count)
    if mode == "first":
        return steps[:n]
    if mode == "random":
        perm = torch.randperm(len(steps), generator=generator).tolist()
        return sorted(steps[i] for i in perm[:n])
    raise ValueError(f"timestep mode must be 'first' or 'random', got {mode!r}")


def _subset_size(candidates: int, fraction: float, count: int | None) -> int:
    return min(candidates, count) if count is not None else max(1, int(candidates * fraction))


def select_timesteps_per_sample(sde_steps: torch.Tensor, fraction: float, generators: list[torch.Generator],
                                exclude_last: bool = False, count: int | None = None) -> torch.Tensor:
    """A fresh random subset for each sample (Pref-GRPO's per-sample permutation, DiffusionNFT's
    random 9 of 10): row i holds int(n * fraction) (or `count`) distinct candidate steps, sorted,
    drawn from generators[i]. (B, k) long."""
    steps = torch.tensor(candidate_steps(sde_steps, exclude_last))
    n = _subset_size(len(steps), fraction, count)
    rows = [steps[torch.randperm(len(steps), generator=g)[:n]].sort().values for g in generators]
    return torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.long)


@contextlib.contextmanager
def swapped_in(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """Temporarily load `values` into `params` (LoRA or full weights alike): EMA weights for
    evaluation, NFT's old policy for sampling."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v.to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


class EMA:
    """Exponential moving average of the trained parameters, updated every `every` steps.

    With `warmup` the decay of an update is min((1 + n) / (10 + n), decay), n = the EMA updates
    made before it (Adv-GRPO's schedule), so early averages follow the weights closely. n is
    `num_updates`, which checkpoints save and restore, so a resumed run continues the schedule.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int = 1, warmup: bool = False):
        self.params = list(params)
        self.decay, self.every, self.warmup = decay, every, warmup
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.num_updates
        return min((1 + n) / (10 + n), self.decay) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.every:
            return
        decay = self.current_decay()
        self.num_updates += 1
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - decay)

    def swapped_in(self):
        """Temporarily load the EMA weights into the model (for evaluation and saving)."""
        return swapped_in(self.params, self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int = 0) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"ema.{i}"])
        self.num_updates = num_updates

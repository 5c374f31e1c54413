"""One denoising step of a rectified-flow sampler, with the log-probability GRPO needs.

Conventions (Flow-GRPO, arXiv 2505.05470):
  x_t = (1 - t) x_0 + t eps, the model predicts v = eps - x_0, sampling runs t = 1 -> 0.
  `sigma` is the current noise level, `sigma_next` the next (smaller) one, dt = sigma_next - sigma < 0.
  Tensors `sigma`/`sigma_next` may be Python floats, 0-d, or per-sample (B,) tensors.

Kinds:
  ode       x' = x + v dt                                   (Euler; log_prob = 0, std = 0)
  flow_sde  s_t = a * sqrt(sigma / (1 - sigma~)),  sigma~ = sigma except at sigma = 1 where the
            denominator uses sigma_next (the reference substitutes sigma_1 there, which at
            the first step is exactly sigma_next; the numerator keeps sigma)
            mean = x (1 + s_t^2 / (2 sigma) dt) + v (1 + s_t^2 (1 - sigma) / (2 sigma)) dt
            std  = s_t sqrt(-dt);   x' = mean + std * eps
  cps       s_t = sigma_next sin(a pi / 2);  x0 = x - sigma v;  x1 = x + (1 - sigma) v
            mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - s_t^2) x1;  std = s_t
            (coefficients-preserving: x' keeps the marginal form (1 - sigma') x0 + sigma' eps)

log_prob is the Gaussian log-density of x' under N(mean, std^2), computed in float32 and
reduced over all non-batch dimensions by `reduction`: "mean" (the reference convention;
per-pixel, so it does not scale with resolution) or "sum" (the true log-density).

CPS log-prob convention (`cps_logprob`): "true" (default) keeps the Gaussian density. The CPS
reference implementation scores a transition as -(x' - mean)^2 only, dropping the constants
and also the factor 1/(2 s_t^2); s_t does not depend on the parameters, so its log-ratios are
2 s_t^2 times the true ones (not equal to them), which changes when the ratio clip binds.
"reference" reproduces that convention; it applies to the cps kind only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

KINDS = ("ode", "flow_sde", "cps")
CPS_LOGPROBS = ("true", "reference")


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    log_prob: torch.Tensor  # (B,), float32
    mean: torch.Tensor
    std: torch.Tensor  # broadcastable to sample


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2) elementwise, reduced over non-batch dims."""
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return _reduce(lp, reduction)


def _reduce(lp: torch.Tensor, reduction: str) -> torch.Tensor:
    dims = tuple(range(1, lp.ndim))
    if reduction == "mean":
        return lp.mean(dim=dims)
    if reduction == "sum":
        return lp.sum(dim=dims)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def step_std(sigma, sigma_next, noise_level: float, kind: str, like: torch.Tensor) -> torch.Tensor:
    """The std of x' given x (what the KL term divides by)."""
    s = _per_sample(sigma, like)
    s_next = _per_sample(sigma_next, like)
    if kind == "flow_sde":
        denom = torch.where(s >= 1.0, s_next, s)
        s_t = noise_level * torch.sqrt(s / (1 - denom))
        return s_t * torch.sqrt(s - s_next)
    if kind == "cps":
        return s_next * math.sin(noise_level * math.pi / 2)
    return torch.zeros_like(s)


def sde_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma,
    sigma_next,
    noise: torch.Tensor | None = None,
    noise_level: float = 0.7,
    kind: str = "flow_sde",
    prev_sample: torch.Tensor | None = None,
    reduction: str = "mean",
    cps_logprob: str = "true",
) -> StepOutput:
    """Advance `sample` from `sigma` to `sigma_next`.

    Give `noise` to draw x' = mean + std * noise (deterministic for a given noise), or give
    `prev_sample` to score an existing transition (the GRPO update recomputes log-probs of
    stored rollouts this way). Math runs in float32 whatever the model dtype.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if cps_logprob not in CPS_LOGPROBS:
        raise ValueError(f"cps_logprob must be one of {CPS_LOGPROBS}, got {cps_logprob!r}")
    v = velocity.float()
    x = sample.float()
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    dt = s_next - s
    if kind == "ode" or noise_level == 0 and kind == "flow_sde":
        mean = x + v * dt
        out = mean if prev_sample is None else prev_sample.float()
        return StepOutput(out, torch.zeros(x.shape[0], device=x.device), mean, torch.zeros_like(s))
    if kind == "flow_sde":
        denom = torch.where(s >= 1.0, s_next, s)
        s_t = noise_level * torch.sqrt(s / (1 - denom))
        mean = x * (1 + s_t**2 / (2 * s) * dt) + v * (1 + s_t**2 * (1 - s) / (2 * s)) * dt
        std = s_t * torch.sqrt(-dt)
    else:  # cps
        s_t = s_next * math.sin(noise_level * math.pi / 2)
        x0 = x - s * v
        x1 = x + (1 - s) * v
        mean = (1 - s_next) * x0 + torch.sqrt(torch.clamp(s_next**2 - s_t**2, min=0)) * x1
        std = s_t
    if prev_sample is None:
        if noise is None:
            raise ValueError("sde_step needs `noise` (to sample) or `prev_sample` (to score)")
        prev = mean + std * noise.float()
    else:
        prev = prev_sample.float()
    # At sigma_next = 0 (the last step) std is 0 and the density is undefined: score it 0.
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    if kind == "cps" and cps_logprob == "reference":
        log_prob = _reduce(-((prev.detach() - mean) ** 2), reduction)  # the reference's, see the module doc
    else:
        log_prob = gaussian_log_prob(prev.detach(), mean, safe_std, reduction)
    log_prob = torch.where(std.reshape(-1) > 0, log_prob, torch.zeros_like(log_prob))
    return StepOutput(prev, log_prob, mean, std)

"""DPM-Solver++(2M): a deterministic second-order multistep solver for flow models.

Rectified flow x_t = alpha_t x0 + sigma_t eps with alpha_t = 1 - t, sigma_t = t; the model's
velocity v gives the data prediction x0_hat = x - t v. With lambda = log(alpha / sigma) and
h = lambda_next - lambda (DPM-Solver++, data-prediction form, arXiv 2211.01095):

    first order   x' = (t' / t) x + c x0_hat,            c = alpha' - t' alpha / t  (= alpha' (1 - e^-h))
    second order  x' = (t' / t) x + c (D0 + D1 / 2),     D0 = x0_hat,  D1 = (x0_hat - x0_prev) h / h_prev

with h_prev = lambda - lambda_prev of the step before. The first step (no history) and the step
into t' = 0 are first order; at t' = 0 the update is x0_hat itself. A previous step that
started at t = 1 has lambda_prev = -inf, so its slope term vanishes (h / h_prev = 0): that
step is first order too, as in the closed form. The first-order update equals the Euler
step x + (t' - t) v exactly in exact arithmetic, so the solver differs from `ode` only
through D1.

The solver needs nothing but velocities and noise levels, so every backend runs it; the
`sde_steps` of such a rollout are all False (no log-probs), as with `ode`.
"""

from __future__ import annotations

import math

import torch


def _log_snr(t: float) -> float:
    """lambda = log((1 - t) / t); -inf at t = 1, +inf at t = 0."""
    if t >= 1.0:
        return -math.inf
    if t <= 0.0:
        return math.inf
    return math.log1p(-t) - math.log(t)


def dpm2_step(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next,
              prev_x0: torch.Tensor | None = None, prev_sigma=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step from `sigma` to `sigma_next` (scalars). Returns (x', x0_hat);
    pass x0_hat and sigma back as `prev_x0`, `prev_sigma` to the next step. Math in float64
    for the coefficients, float32 for the tensors."""
    s, s_next = float(sigma), float(sigma_next)
    x = sample.float()
    x0 = x - s * velocity.float()
    if s_next <= 0.0:
        return x0, x0
    ratio = s_next / s
    c = (1.0 - s_next) - s_next * (1.0 - s) / s
    if prev_x0 is None or prev_sigma is None:
        return ratio * x + c * x0, x0
    h = _log_snr(s_next) - _log_snr(s)
    h_prev = _log_snr(s) - _log_snr(float(prev_sigma))
    slope = h / h_prev if math.isfinite(h_prev) else 0.0
    d1 = (x0 - prev_x0.float()) * slope
    return ratio * x + c * (x0 + 0.5 * d1), x0


def shift_through(sigma: float, t: float) -> float:
    """The shift k of the curve sigma = k t / (1 + (k - 1) t) through (t, sigma): SD3's static
    shift and FLUX's / Qwen-Image's resolution-dependent one (k = e^mu) are all of this form."""
    return sigma * (1.0 - t) / (t * (1.0 - sigma))


def compressed_tail(sigmas: torch.Tensor, start: int, ratio: float) -> torch.Tensor:
    """MixGRPO-Flash's schedule: the steps from index `start` on, replaced by fewer points on the
    same shift curve. The N-step schedule's point k sits at t_k = 1 - k / N; the tail keeps
    sigmas[start] and spaces int(max((N - start + 1) ratio, 1)) points (at least 2) evenly in t
    from t_start to 0, so one step fewer than points, each mapped through the shift k the
    schedule has at `start`. (N - start + 1 counts the steps from the window's last one on, as
    the official code counts them.)
    Returns the whole schedule: sigmas[:start + 1] then the new points after it."""
    n = len(sigmas) - 1
    if not 0 < start < n:
        raise ValueError(f"the compressed tail must start inside the schedule (1..{n - 1}), got {start}")
    points = int(max((n - start + 1) * ratio, 1))
    s0, t0 = float(sigmas[start]), 1.0 - start / n
    k = shift_through(s0, t0)
    ts = torch.linspace(t0, 0.0, max(points, 2), dtype=torch.float64)[1:]
    tail = k * ts / (1 + (k - 1) * ts)
    return torch.cat([sigmas[:start + 1].double(), tail]).to(sigmas.dtype)

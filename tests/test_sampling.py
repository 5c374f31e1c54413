import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowgrpo.sampling import gaussian_log_prob, sde_mask, sde_step, step_std


def _inputs(seed=0, shape=(3, 4, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_ode_equals_diffusers_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    v, x, _ = _inputs()
    for i in range(10):
        ref = sched.step(v, sched.timesteps[i], x, return_dict=False)[0]
        ours = sde_step(v, x, sched.sigmas[i], sched.sigmas[i + 1], kind="ode").prev_sample
        assert torch.allclose(ours, ref, atol=1e-6)
    # the scheduler keeps an internal step index; reset for the next loop
    sched.set_timesteps(10)


def test_flow_sde_with_zero_noise_is_the_ode():
    v, x, eps = _inputs(1)
    a = sde_step(v, x, 0.6, 0.45, eps, noise_level=0.0, kind="flow_sde").prev_sample
    b = sde_step(v, x, 0.6, 0.45, kind="ode").prev_sample
    assert torch.equal(a, b)


@pytest.mark.parametrize("sigma,sigma_next", [(0.8, 0.6), (0.3, 0.1), (0.1, 0.0)])
def test_flow_sde_closed_form(sigma, sigma_next):
    v, x, eps = _inputs(2)
    a = 0.7
    out = sde_step(v, x, sigma, sigma_next, eps, noise_level=a, kind="flow_sde")
    dt = sigma_next - sigma
    s_t = a * math.sqrt(sigma / (1 - sigma))
    mean = x * (1 + s_t**2 / (2 * sigma) * dt) + v * (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s_t * math.sqrt(-dt)
    assert torch.allclose(out.mean, mean, atol=1e-6)
    assert torch.allclose(out.std.flatten(), torch.full((3,), std), atol=1e-7)
    assert torch.allclose(out.prev_sample, mean + std * eps, atol=1e-6)
    ref_lp = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, ref_lp, atol=1e-5)
    ref_sum = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).sum(dim=(1, 2, 3))
    lp_sum = sde_step(v, x, sigma, sigma_next, noise_level=a, kind="flow_sde", prev_sample=out.prev_sample,
                      reduction="sum").log_prob
    assert torch.allclose(lp_sum, ref_sum, rtol=1e-5)


def test_sigma_one_uses_sigma_next_in_the_denominator():
    v, x, eps = _inputs(3)
    out = sde_step(v, x, 1.0, 0.9, eps, noise_level=0.7, kind="flow_sde")
    s_t = 0.7 * math.sqrt(1.0 / (1 - 0.9))
    assert torch.isfinite(out.log_prob).all()
    assert torch.allclose(out.std.flatten(), torch.full((3,), s_t * math.sqrt(0.1)), atol=1e-6)


def test_scoring_a_transition_matches_sampling_it():
    v, x, eps = _inputs(4)
    out = sde_step(v, x, 0.7, 0.5, eps, noise_level=0.7, kind="flow_sde")
    again = sde_step(v, x, 0.7, 0.5, noise_level=0.7, kind="flow_sde", prev_sample=out.prev_sample)
    assert torch.equal(out.log_prob, again.log_prob)
    # deterministic given the noise
    assert torch.equal(sde_step(v, x, 0.7, 0.5, eps, 0.7).prev_sample, out.prev_sample)


def test_cps_keeps_marginal_coefficients_and_std():
    # If x = (1 - s) x0 + s e and v = e - x0 exactly, CPS's x' = (1 - s') x0 + s' e' with
    # e' = (sqrt(s'^2 - s_t^2) e + s_t eps) / s' a unit Gaussian mixture: check both parts.
    g = torch.Generator().manual_seed(5)
    x0, e, eps = (torch.randn(2000, 1, 1, 1, generator=g) for _ in range(3))
    s, s_next, a = 0.7, 0.5, 0.6
    x = (1 - s) * x0 + s * e
    out = sde_step(e - x0, x, s, s_next, eps, noise_level=a, kind="cps")
    s_t = s_next * math.sin(a * math.pi / 2)
    assert torch.allclose(out.std.flatten(), torch.full((2000,), s_t), atol=1e-7)
    noise_part = (out.prev_sample - (1 - s_next) * x0) / s_next
    expected = (math.sqrt(s_next**2 - s_t**2) * e + s_t * eps) / s_next
    assert torch.allclose(noise_part, expected, atol=1e-5)
    assert abs(float(noise_part.std()) - 1.0) < 0.05
    lp = torch.distributions.Normal(out.mean, s_t).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, lp, atol=1e-5)


def test_step_std_matches_step_and_fp32_math():
    v, x, eps = _inputs(6)
    out = sde_step(v.bfloat16(), x.bfloat16(), 0.5, 0.3, eps, 0.7, "flow_sde")
    assert out.log_prob.dtype == torch.float32 and out.mean.dtype == torch.float32
    assert torch.allclose(step_std(0.5, 0.3, 0.7, "flow_sde", x).flatten(), out.std.flatten())
    with pytest.raises(ValueError, match="kind"):
        sde_step(v, x, 0.5, 0.3, eps, 0.7, "ddim")
    with pytest.raises(ValueError, match="noise"):
        sde_step(v, x, 0.5, 0.3, None, 0.7, "flow_sde")
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, x, torch.ones_like(x), "max")


def test_fast_window_mask():
    assert sde_mask(5, None).all()
    m = sde_mask(8, (2, 3))
    assert m.tolist() == [False, False, True, True, True, False, False, False]
    with pytest.raises(ValueError):
        sde_mask(4, (4, 1))

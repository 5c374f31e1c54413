"""sample.kind dpm2: DPM-Solver++(2M) for flow models, against diffusers' DPMSolverMultistepScheduler
in its flow-matching mode, on a tiny velocity model; its history rules checked by hand; the
MixGRPO-Flash compressed tail; and a rollout through the policy interface."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from flowgrpo.sampling import Window, compressed_tail, dpm2_step, rollout, sde_mask, sde_step


class TinyVelocity(torch.nn.Module):
    """A small non-linear velocity field v(x, t): a 1x1 conv net conditioned on t."""

    def __init__(self, channels: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Conv2d(channels + 1, 16, 1)
        self.out = torch.nn.Conv2d(16, channels, 1)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.out(torch.tanh(self.inp(torch.cat([x, t], dim=1))))


def flow_dpm_scheduler(**kw) -> DPMSolverMultistepScheduler:
    """diffusers' DPM-Solver++ 2M (midpoint) for flow models: data prediction from the velocity."""
    return DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                                       prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                       lower_order_final=True, final_sigmas_type="zero", **kw)


@pytest.mark.parametrize("steps", [10, 25])
@torch.no_grad()
def test_dpm2_matches_diffusers_flow_dpm_solver_on_a_tiny_model(steps):
    model = TinyVelocity()
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sched = flow_dpm_scheduler()
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.clone()
    assert len(sigmas) == steps + 1 and float(sigmas[-1]) == 0.0
    ref, ref_states = x0.clone(), []
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(model(ref, sigmas[i]), t, ref, return_dict=False)[0]
        ref_states.append(ref)
    ours, prev_x0, prev_sigma = x0.clone(), None, None
    for i in range(steps):
        ours, x0_hat = dpm2_step(ours, model(ours, sigmas[i]), sigmas[i], sigmas[i + 1], prev_x0, prev_sigma)
        prev_x0, prev_sigma = x0_hat, sigmas[i]
        assert torch.allclose(ours, ref_states[i], atol=2e-5, rtol=1e-5), f"step {i}"
    # it is a different solver from Euler: the second-order term moves the result
    euler = x0.clone()
    for i in range(steps):
        euler = sde_step(model(euler, sigmas[i]), euler, sigmas[i], sigmas[i + 1], kind="ode").prev_sample
    assert (euler - ours).abs().max() > 1e-3


def test_dpm2_first_order_is_the_euler_step_and_the_last_step_is_the_x0_prediction():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    first, x0 = dpm2_step(x, v, 0.8, 0.55)
    assert torch.allclose(first, x + (0.55 - 0.8) * v, atol=1e-6)
    assert torch.allclose(x0, x - 0.8 * v)
    last, _ = dpm2_step(x, v, 0.2, 0.0, prev_x0=torch.zeros_like(x), prev_sigma=0.4)
    assert torch.allclose(last, x - 0.2 * v)
    # from sigma 1 (pure noise) the first-order step is sigma' x + (1 - sigma') x0_hat
    start, _ = dpm2_step(x, v, 1.0, 0.7)
    assert torch.allclose(start, 0.7 * x + 0.3 * (x - v), atol=1e-6)


def test_dpm2_second_order_step_by_hand():
    """One 2M step with numbers worked out by hand: sigma 0.5 -> 0.25 after a step from 0.75."""
    x, v, prev_x0 = torch.tensor([[1.0]]), torch.tensor([[0.4]]), torch.tensor([[0.5]])
    # x0_hat = 1 - 0.5 * 0.4 = 0.8; lambda(t) = log((1 - t) / t): lambda(0.75) = -log 3,
    # lambda(0.5) = 0, lambda(0.25) = log 3, so h = h_prev = log 3 and D1 = 0.8 - 0.5 = 0.3;
    # c = 0.75 - 0.25 * 0.5 / 0.5 = 0.5; x' = (0.25 / 0.5) * 1 + 0.5 * (0.8 + 0.15) = 0.975
    out, x0 = dpm2_step(x, v, 0.5, 0.25, prev_x0, 0.75)
    assert float(x0) == pytest.approx(0.8) and float(out) == pytest.approx(0.975, abs=1e-6)
    # a previous step from sigma 1 carries no slope (lambda = -inf): first order, 0.5 + 0.5 * 0.8
    out1, _ = dpm2_step(x, v, 0.5, 0.25, prev_x0, 1.0)
    assert float(out1) == pytest.approx(0.9, abs=1e-6)


def test_compressed_tail_by_hand():
    """MixGRPO-Flash on 25 shifted steps: a window ending at step 4 (its last step 3) keeps
    int(22 * 0.4) = 8 points from t = 21/25 to 0: 7 steps on the shift-3 curve."""
    n, k = 25, 3.0
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    sigmas = (k * t / (1 + (k - 1) * t)).float()
    out = compressed_tail(sigmas, 4, 0.4)
    assert len(out) == 4 + 8 and torch.equal(out[:5], sigmas[:5]) and float(out[-1]) == 0.0
    ts = torch.linspace(21 / 25, 0, 8, dtype=torch.float64)
    assert torch.allclose(out[4:].double(), k * ts / (1 + (k - 1) * ts), atol=1e-6)
    assert len(compressed_tail(sigmas, 4, 0.2)) - 1 == 4 + int(22 * 0.2) - 1  # Flash*: 4 steps after the window


class _Policy:
    """The policy interface a rollout needs, around TinyVelocity."""

    device = torch.device("cpu")

    def __init__(self, n_shift: float = 3.0):
        self.model, self.k = TinyVelocity(), n_shift
        self.calls = 0

    def sigmas(self, num_steps, height, width):
        t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
        return (self.k * t / (1 + (self.k - 1) * t)).float()

    def latent_shape(self, height, width):
        return (4, height, width)

    def velocity(self, x, sigma, cond, negative=None, guidance=1.0):
        self.calls += 1
        return self.model(x, sigma)

    def decode(self, latents):
        return latents[:, :3].clamp(0, 1)


@torch.no_grad()
def test_rollout_dpm2_and_a_flash_window():
    pol, cond = _Policy(), {"emb": torch.zeros(2, 1)}
    gen = [torch.Generator().manual_seed(i) for i in range(2)]
    init = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    traj = rollout(pol, cond, None, num_steps=10, guidance=1.0, noise_level=0.7, kind="dpm2", height=6, width=6,
                   generator=gen, init_latents=init)
    # the rollout is the solver itself, step by step
    x, prev_x0, prev_sigma = init.clone(), None, None
    for i in range(10):
        x, x0 = dpm2_step(x, pol.model(x, traj.sigmas[i]), traj.sigmas[i], traj.sigmas[i + 1], prev_x0, prev_sigma)
        prev_x0, prev_sigma = x0, traj.sigmas[i]
    assert torch.allclose(traj.latents[:, -1], x) and float(traj.log_probs.abs().sum()) == 0.0
    # MixGRPO-Flash: SDE on [2, 6), Euler before, dpm2 on a compressed tail after it
    pol.calls = 0
    win = Window(2, 4, after="dpm2", compress=0.4)
    traj = rollout(pol, cond, None, num_steps=25, guidance=1.0, noise_level=0.7, kind="flow_sde", height=6, width=6,
                   generator=gen, init_latents=init, window=win)
    n_steps = 6 + int((25 - 6 + 1) * 0.4) - 1  # 6 steps to the window's end, then 8 points = 7 steps
    assert len(traj.sigmas) == n_steps + 1 and pol.calls == n_steps and traj.latents.shape[1] == n_steps + 1
    assert traj.sde_steps.tolist() == sde_mask(n_steps, (2, 4)).tolist()
    stochastic = traj.log_probs[0] != 0
    assert stochastic[2:6].all() and not stochastic[:2].any() and not stochastic[6:].any()
    assert math.isclose(float(traj.sigmas[-1]), 0.0)


def test_sample_and_eval_commands_take_the_solver(tiny_shapes_model, tmp_path):
    """`flowgrpo sample --solver dpm2` and `eval shapes --solver dpm2` run the solver end to end;
    from the same seeds its images differ from Euler's."""
    import numpy as np
    from PIL import Image

    from flowgrpo.cli import main

    out = {}
    for solver in ("ode", "dpm2"):
        d = tmp_path / solver
        assert main(["sample", "--model", str(tiny_shapes_model), "--prompt", "a photo of a red circle", "--n", "2",
                     "--steps", "4", "--solver", solver, "--out", str(d), "--device", "cpu"]) == 0
        out[solver] = np.asarray(Image.open(d / "0000_0.png"), dtype=np.int16)
    assert np.abs(out["ode"] - out["dpm2"]).max() > 0
    assert main(["eval", "shapes", "--model", str(tiny_shapes_model), "--prompts", "shapes:test", "--tags", "colors",
                 "--n", "1", "--steps", "3", "--solver", "dpm2", "--out", str(tmp_path / "t.json")]) == 0
    assert (tmp_path / "t.json").is_file()

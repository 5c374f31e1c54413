"""Run a policy from noise to images and keep what GRPO needs to recompute log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import Condition
from .dpm import compressed_tail, dpm2_step
from .step import sde_step

# Rollout samplers: the SDE step kinds of step.py, and "dpm2", a deterministic second-order
# multistep solver (dpm.py) that, like "ode", stores no log-probs.
SAMPLERS = ("ode", "flow_sde", "cps", "dpm2")
AFTER_WINDOW = ("ode", "dpm2")

# What a trajectory's `images` show (sample.judged_image): the decoded final sample, or the last
# step's clean prediction x - sigma v (Pref-GRPO decodes that: the final SDE sample keeps the last
# step's noise). The two agree when the last step is deterministic (ode, or cps whose s_t is 0 there).
JUDGED_IMAGES = ("final", "clean_prediction")


@dataclass
class Trajectory:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    latents: torch.Tensor  # (B, N + 1, *latent) every state x_0 (noise) ... x_N (clean)
    log_probs: torch.Tensor  # (B, N) log p(x_{i+1} | x_i); 0 on ODE steps
    sigmas: torch.Tensor  # (N + 1,)
    sde_steps: torch.Tensor  # (N,) bool: stochastic transitions, the only trainable ones
    means: torch.Tensor | None = None  # (B, N, *latent) each step's mean, when asked for (keep_means)

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass(frozen=True)
class Window:
    """The stochastic steps [start, start + size) of a rollout (Flow-GRPO-Fast, MixGRPO). Steps
    before it run the Euler ODE; steps after it run `after` ("ode" or "dpm2"), and with
    `compress` < 1 on fewer, wider steps (MixGRPO-Flash: dpm.compressed_tail)."""

    start: int
    size: int
    after: str = "ode"
    compress: float = 1.0

    def __iter__(self):  # unpacks as (start, size), the plain tuple form
        return iter((self.start, self.size))


def sde_mask(num_steps: int, window: tuple[int, int] | Window | None) -> torch.Tensor:
    """All steps stochastic, or only [start, start + size) (Flow-GRPO-Fast)."""
    if window is None:
        return torch.ones(num_steps, dtype=torch.bool)
    start, size = window
    if not 0 <= start < num_steps or size < 1:
        raise ValueError(f"SDE window {window} does not fit {num_steps} steps")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start:start + size] = True
    return mask


def window_start(iteration: int, lo: int, hi: int, schedule: str = "random", every: int = 1, stride: int = 1,
                 generator: torch.Generator | None = None) -> int:
    """The first stochastic step of `iteration`'s window. random: uniform in [lo, hi] from
    `generator` (Flow-GRPO-Fast); progressive: MixGRPO's sliding window, lo, lo + stride, ... while
    <= hi, `every` iterations at each position, then back to lo (stride 0: always lo). A function
    of the iteration alone, so a resumed run continues the schedule."""
    if schedule == "random":
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))
    if schedule != "progressive":
        raise ValueError(f"window schedule must be 'random' or 'progressive', got {schedule!r}")
    positions = (hi - lo) // stride + 1 if stride > 0 else 1
    return lo + stride * ((iteration // every) % positions)


def randn_like_batch(shape: tuple[int, ...], batch: int, generator) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from one generator, or one generator per image
    (then each image's noise is independent of the batch it is sampled in)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        return torch.stack([torch.randn(shape, generator=g) for g in generator])
    return torch.randn((batch, *shape), generator=generator)


def initial_noise(shape: tuple[int, ...], batch: int, generator,
                  group_size: int = 1, same_per_group: bool = False) -> torch.Tensor:
    """Initial latents, drawn on the CPU so a seed gives the same images on any device."""
    if same_per_group:
        if batch % group_size:
            raise ValueError(f"batch {batch} is not a multiple of the group size {group_size}")
        gens = generator[::group_size] if isinstance(generator, (list, tuple)) else generator
        return randn_like_batch(shape, batch // group_size, gens).repeat_interleave(group_size, dim=0)
    return randn_like_batch(shape, batch, generator)


@torch.no_grad()
def rollout(policy, cond: Condition, negative: Condition | None, *, num_steps: int, guidance: float,
            noise_level: float, kind: str, height: int, width: int, generator,
            window: tuple[int, int] | Window | None = None, init_latents: torch.Tensor | None = None,
            decode: bool = True, cps_logprob: str = "true", judged: str = "final",
            keep_means: bool = False) -> Trajectory:
    """Sample a batch. Steps inside `window` (all when None) use `kind` (SAMPLERS), the rest
    the Euler ODE, or after the window the window's `after` solver on its (compressed) steps.

    `judged`: which latent `images` decode (JUDGED_IMAGES). `keep_means`: also return every
    step's Gaussian mean (objectives that compare old and new means, e.g. RatioNorm).

    `generator` is one torch.Generator or a list with one per image (the trainer's choice, so
    that an image's noise depends only on its seed, not on which process or batch drew it).
    """
    if judged not in JUDGED_IMAGES:
        raise ValueError(f"judged must be one of {JUDGED_IMAGES}, got {judged!r}")
    if kind not in SAMPLERS:
        raise ValueError(f"kind must be one of {SAMPLERS}, got {kind!r}")
    batch = next(iter(cond.values())).shape[0]
    device = policy.device
    sigmas = policy.sigmas(num_steps, height, width)
    after, end = "ode", num_steps
    if isinstance(window, Window):
        after, end = window.after, window.start + window.size
        if window.compress < 1.0 and end < num_steps:
            sigmas = compressed_tail(sigmas, end, window.compress)
            num_steps = len(sigmas) - 1
    mask = sde_mask(num_steps, window)
    x = init_latents if init_latents is not None else initial_noise(policy.latent_shape(height, width), batch, generator)
    x = x.to(device, torch.float32)
    neg = None
    if negative is not None and guidance != 1.0:
        neg = {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in negative.items()}
    states, logps, means = [x], [], []
    clean = x
    prev_x0 = prev_sigma = None  # the multistep solver's history: every step's x_0 prediction
    for i in range(num_steps):
        v = policy.velocity(x, sigmas[i], cond, neg, guidance)
        step_kind = kind if mask[i] else (after if i >= end else "ode")
        if step_kind == "dpm2":
            x_next, x0 = dpm2_step(x, v, sigmas[i], sigmas[i + 1], prev_x0, prev_sigma)
            log_prob, mean = torch.zeros(batch, device=x.device), x_next
        else:
            noise = randn_like_batch(x.shape[1:], batch, generator).to(device) if step_kind != "ode" else None
            out = sde_step(v, x, sigmas[i], sigmas[i + 1], noise, noise_level, step_kind, cps_logprob=cps_logprob)
            x_next, log_prob, mean = out.prev_sample, out.log_prob, out.mean
            x0 = x - sigmas[i] * v.float()
        if i == num_steps - 1 and judged == "clean_prediction":
            clean = x0  # the last step's prediction of x_0
        prev_x0, prev_sigma = x0, sigmas[i]
        x = x_next
        states.append(x)
        logps.append(log_prob)
        if keep_means:
            means.append(mean)
    images = policy.decode(clean if judged == "clean_prediction" else x) if decode else torch.empty(0)
    return Trajectory(images, torch.stack(states, 1), torch.stack(logps, 1), sigmas, mask,
                      torch.stack(means, 1) if keep_means else None)

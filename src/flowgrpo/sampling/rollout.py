"""Run a policy from noise to images and keep what GRPO needs to recompute log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import Condition
from .step import sde_step

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


def sde_mask(num_steps: int, window: tuple[int, int] | None) -> torch.Tensor:
    """All steps stochastic, or only [start, start + size) (Flow-GRPO-Fast)."""
    if window is None:
        return torch.ones(num_steps, dtype=torch.bool)
    start, size = window
    if not 0 <= start < num_steps or size < 1:
        raise ValueError(f"SDE window {window} does not fit {num_steps} steps")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start:start + size] = True
    return mask


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
            window: tuple[int, int] | None = None, init_latents: torch.Tensor | None = None,
            decode: bool = True, cps_logprob: str = "true", judged: str = "final",
            keep_means: bool = False) -> Trajectory:
    """Sample a batch. Steps inside `window` (all when None) use `kind`, the rest the ODE.

    `judged`: which latent `images` decode (JUDGED_IMAGES). `keep_means`: also return every
    step's Gaussian mean (objectives that compare old and new means, e.g. RatioNorm).

    `generator` is one torch.Generator or a list with one per image (the trainer's choice, so
    that an image's noise depends only on its seed, not on which process or batch drew it).
    """
    if judged not in JUDGED_IMAGES:
        raise ValueError(f"judged must be one of {JUDGED_IMAGES}, got {judged!r}")
    batch = next(iter(cond.values())).shape[0]
    device = policy.device
    sigmas = policy.sigmas(num_steps, height, width)
    mask = sde_mask(num_steps, window)
    x = init_latents if init_latents is not None else initial_noise(policy.latent_shape(height, width), batch, generator)
    x = x.to(device, torch.float32)
    neg = None
    if negative is not None and guidance != 1.0:
        neg = {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in negative.items()}
    states, logps, means = [x], [], []
    clean = x
    for i in range(num_steps):
        v = policy.velocity(x, sigmas[i], cond, neg, guidance)
        step_kind = kind if mask[i] else "ode"
        noise = randn_like_batch(x.shape[1:], batch, generator).to(device) if step_kind != "ode" else None
        out = sde_step(v, x, sigmas[i], sigmas[i + 1], noise, noise_level, step_kind, cps_logprob=cps_logprob)
        if i == num_steps - 1 and judged == "clean_prediction":
            clean = x - sigmas[i] * v.float()  # the last step's prediction of x_0
        x = out.prev_sample
        states.append(x)
        logps.append(out.log_prob)
        if keep_means:
            means.append(out.mean)
    images = policy.decode(clean if judged == "clean_prediction" else x) if decode else torch.empty(0)
    return Trajectory(images, torch.stack(states, 1), torch.stack(logps, 1), sigmas, mask,
                      torch.stack(means, 1) if keep_means else None)

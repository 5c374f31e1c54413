"""The one interface every training objective implements, and what the forward-process ones share.

The trainer runs, per iteration:
    with objective.sampling_context(): rollouts           (which weights sample)
    rewards -> advantages (gathered: batch.all_advantages, batch.all_group_ids)
    steps = objective.prepare(batch, iteration)           (what the inner loop iterates over)
    for each epoch, chunk, microbatch idx, step in steps:
        loss, stats = objective.loss(batch, idx, weights, step, advantages[idx]); backward
        (optimizer step) -> objective.after_optimizer_step()
    objective.after_iteration(iteration) -> extra metrics
and saves objective.state_dict() in its checkpoints (as the reward-state file "objective").
The trainer knows no objective by its formula: it looks the class up by `optim.policy_loss`.

Randomness: every draw comes from `derived_generator(seed, iteration, tag, global image index, ...)`,
never from a running generator, so a resumed run draws exactly what an uninterrupted one
would and an image's draws do not depend on which process holds it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ...models import index_condition
from ..grpo import LossStats, select_timesteps, select_timesteps_per_sample, swapped_in  # noqa: F401 (nft)

# tags of derived_generator draws (the trainer uses 1-5 for prompts, windows, noise, timesteps)
TAG_AWM, TAG_FLOW, TAG_TARGETS, TAG_GROUP_FLOW = 6, 7, 8, 9


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers (seed, iteration, index, ...)."""
    h = 0
    for k in keys:
        h = (h * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


@dataclass
class Services:
    """What the trainer lends an objective."""

    params: list[torch.nn.Parameter]  # the trained parameters (float32), in a fixed order
    # velocity(x, sigma, cond, reference=False): the model's velocity as the sampler uses it
    # (classifier-free guided at sample.guidance); reference=True runs the frozen reference
    velocity: Callable[..., torch.Tensor]
    seed: int
    resolution: int  # pixels of the rollouts (renderers of supervised targets draw at this size)
    train_items: list[dict] = field(default_factory=list)  # the training prompts (checked up front)
    # a context for gradient-free forwards of the trained model (model.fold_lora: the LoRA folded in)
    inference: Callable[[], contextlib.AbstractContextManager] = torch.no_grad


class Objective:
    """Base class: subclasses implement `prepare` and `loss`; the hooks default to nothing."""

    name = ""
    needs_sde = False  # rollouts must be stochastic with stored log-probs (sample.kind flow_sde/cps)
    uses_advantages = True  # False: advantages are ignored and zero-signal groups are not dropped

    def __init__(self, cfg, policy, services: Services):
        self.cfg, self.policy, self.services = cfg, policy, services
        self.seed = services.seed

    @classmethod
    def needs_reference(cls, cfg) -> bool:
        """Whether the loss runs the reference model (full fine-tuning then keeps a frozen copy)."""
        return cfg.optim.kl_beta > 0

    @property
    def keeps_step_means(self) -> bool:
        """Whether rollouts must also store each step's Gaussian mean (batch.means)."""
        return False

    def sampling_context(self) -> contextlib.AbstractContextManager:
        """Entered around the rollouts: which weights sample them (default: the trained ones)."""
        return contextlib.nullcontext()

    def prepare(self, batch, iteration: int) -> list:
        """Per-iteration set-up; returns the loss steps the inner loop iterates over."""
        raise NotImplementedError

    def loss(self, batch, idx: torch.Tensor, weights: torch.Tensor, step, adv: torch.Tensor
             ) -> tuple[torch.Tensor, LossStats]:
        """Loss of microbatch `idx` (local sample indices) at one step; `weights` (0/1) mask padding."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        pass

    def after_iteration(self, iteration: int) -> dict:
        """Called once the iteration's optimizer steps are done; returns extra metrics."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def masked_mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over real samples (weights 0 mark padding), as grpo_loss averages."""
    if weights is None:
        return x.mean()
    return (x * weights).sum() / weights.sum().clamp(min=1.0)


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def stats(loss: torch.Tensor, kl: torch.Tensor | None = None) -> LossStats:
    """LossStats of an objective without a likelihood ratio (ratio fields 0)."""
    return LossStats(policy_loss=float(loss.detach()), kl=float(kl.detach()) if kl is not None else 0.0,
                     clip_fraction=0.0, approx_kl=0.0, max_ratio_dev=0.0)


def draw_noise(global_index: torch.Tensor, shape, seed: int, iteration: int, tag: int, k: int,
               sigma: float | torch.Tensor | None = None, sigma_range: tuple[float, float] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (noise level, noise) for draw k: when `sigma` is None, logit-normal (SD3
    pretraining's choice) or, with `sigma_range`, uniform in [lo, hi]; else that level for every
    image, or with a (B,) tensor each image's own. Drawn from each entry of `global_index` (a
    group id instead gives every member of the group the same draw)."""
    sig, eps = [], []
    per_image = isinstance(sigma, torch.Tensor) and sigma.ndim == 1
    for j, gi in enumerate(global_index.tolist()):
        g = derived_generator(seed, iteration, tag, gi, k)
        if sigma is None and sigma_range is not None:
            lo, hi = sigma_range
            sig.append(lo + (hi - lo) * torch.rand((), generator=g))
        elif sigma is None:
            sig.append(torch.sigmoid(torch.randn((), generator=g)))
        else:
            sig.append(torch.as_tensor(sigma[j] if per_image else sigma, dtype=torch.float32))
        eps.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(sig), torch.stack(eps)


def noised(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps (rectified flow), t per sample."""
    t = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * eps


class ForwardObjective(Objective):
    """Forward-process objectives (nft, reward_filtered, supervised): regress the velocity at
    fresh noise levels toward clean samples x0, x_t = (1 - t) x0 + t eps, so rollouts may
    come from any sampler (`sample.kind: ode` included).

    `optim.fm_timesteps`: "rollout" = the sampler's own sigmas (the trained steps picked by
    timestep_mode / timestep_fraction: 9 of 10), each with fresh per-image noise; or a count
    of logit-normal noise levels per image and update. `optim.fm_sigma_range` [lo, hi] draws
    them uniformly in that range instead (or keeps only the rollout sigmas inside it): on the
    shapes model a sample's colour and count are decided above sigma 0.9, where a logit-normal
    draw lands 1.4% of the time (docs/results/objectives.md)."""

    def clean_samples(self, batch, iteration: int) -> torch.Tensor:
        """x0 for every local sample: the rollouts' final latents (subclasses may replace them)."""
        return batch.latents[:, -1]

    def train_sigmas(self, batch, iteration: int) -> list:
        """The noise level of each draw: None (drawn per image), one level for every image, or
        with optim.timestep_subset per_sample a (local images,) tensor of each image's own."""
        o = self.cfg.optim
        if o.fm_timesteps == "rollout":
            n = len(batch.sigmas) - 1
            candidates = torch.ones(min(o.fm_rollout_steps or n, n), dtype=torch.bool)
            if o.timestep_subset == "per_sample":  # each image its own subset, from its global index
                gens = [derived_generator(self.seed, iteration, 5, gi) for gi in batch.global_index.tolist()]
                table = select_timesteps_per_sample(candidates, o.timestep_fraction, gens, count=o.timestep_count)
                return [batch.sigmas[table[:, k]] for k in range(table.shape[1])]
            steps = select_timesteps(candidates, o.timestep_mode, o.timestep_fraction,
                                     derived_generator(self.seed, iteration, 5), count=o.timestep_count)
            sigmas = [batch.sigmas[s] for s in steps]
            if o.fm_sigma_range is not None:
                lo, hi = o.fm_sigma_range
                sigmas = [s for s in sigmas if lo <= float(s) <= hi]
            return sigmas
        return [None] * int(o.fm_timesteps)

    def prepare(self, batch, iteration: int) -> list[int]:
        self.x0 = self.clean_samples(batch, iteration)
        shape = self.x0.shape[1:]
        o = self.cfg.optim
        rng = tuple(o.fm_sigma_range) if o.fm_sigma_range is not None else None
        # shared noise: every member of a group draws from its group id (the same eps at each draw)
        keys, tag = (batch.group_ids, TAG_GROUP_FLOW) if o.fm_group_noise else (batch.global_index, TAG_FLOW)
        self.draws = [draw_noise(keys, shape, self.seed, iteration, tag, k, s, rng)
                      for k, s in enumerate(self.train_sigmas(batch, iteration))]
        if o.fm_noise == "rollout":  # each image's own initial noise: the (noise, image) pair its rollout made
            own = batch.latents[:, 0].float()
            self.draws = [(sig, own) for sig, _ in self.draws]
        return list(range(len(self.draws)))

    def inputs(self, idx, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, sigma, eps, x_t) of microbatch idx at draw k, on the model's device."""
        x0 = self.x0[idx].float()
        sig, eps = self.draws[k]
        sig, eps = sig[idx].to(x0.device), eps[idx].to(x0.device)
        return x0, sig, eps, noised(x0, sig, eps)

    def velocity(self, batch, idx, x_t, sig, reference: bool = False) -> torch.Tensor:
        return self.services.velocity(x_t, sig, index_condition(batch.cond, idx), reference=reference).float()

    def reference_kl(self, batch, idx, x_t, sig, v) -> torch.Tensor:
        """Per-sample mean (v - v_ref)^2: the velocity-space KL surrogate to the reference."""
        with torch.no_grad():
            v_ref = self.velocity(batch, idx, x_t, sig, reference=True)
        return per_sample_mean((v - v_ref) ** 2)

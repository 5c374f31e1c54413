"""Flow-GRPO: the clipped ratio of the SDE steps' Gaussian log-probs (+ KL to the reference).

Per trained transition t of a stored trajectory (x_t -> x_{t+1}, log-prob at sampling time):
    ratio = exp(logp_theta - logp_old),  L = mean max(-A ratio, -A clamp(ratio, 1 -+ eps)) + beta KL
with KL = mean_CHW (mu_theta - mu_ref)^2 / (2 std_t^2). The trained transitions are the first
(or a random) `timestep_fraction` of the stochastic ones (without the sampler's last step when
optim.timestep_exclude_last), one subset for the iteration or, with optim.timestep_subset
per_sample, a fresh one per image. Needs stochastic rollouts.

optim.ratio_norm (Pref-GRPO's RatioNorm): the log-ratio becomes
(logp_theta - logp_old + mean_CHW (mu_theta - mu_old)^2 / (2 std_t^2)) std_t, with mu_old the
step's mean stored at rollout, and each sample's clipped term is divided by |dt| of its step.
"""

from __future__ import annotations

import torch

from ...models import index_condition
from ...sampling import sde_step
from ..grpo import grpo_loss, kl_to_reference, ratio_norm_log_ratio, select_timesteps, select_timesteps_per_sample
from .base import Objective, derived_generator


class RatioObjective(Objective):
    name = "ratio"
    needs_sde = True
    step_table: torch.Tensor | None = None  # per-sample subsets: (local samples, n) step indices

    @property
    def keeps_step_means(self) -> bool:
        return self.cfg.optim.ratio_norm

    def prepare(self, batch, iteration: int) -> list[int]:
        """Shared subset: the step indices. Per-sample subset: slots k = 0..n-1, sample i's
        step at slot k being step_table[i, k], drawn from (seed, iteration, the image's global
        index), so it does not depend on the process holding the image and a resume redraws it."""
        o = self.cfg.optim
        if o.timestep_subset == "per_sample":
            gens = [derived_generator(self.seed, iteration, 5, gi) for gi in batch.global_index.tolist()]
            self.step_table = select_timesteps_per_sample(batch.sde_steps, o.timestep_fraction, gens,
                                                          o.timestep_exclude_last)
            return list(range(self.step_table.shape[1]))
        self.step_table = None
        return select_timesteps(batch.sde_steps, o.timestep_mode, o.timestep_fraction,
                                derived_generator(self.seed, iteration, 5), o.timestep_exclude_last)

    def step_of(self, idx: torch.Tensor, k: int):
        """The step of entry k: an int (shared subset) or a tensor with each sample's own."""
        return k if self.step_table is None else self.step_table[idx, k]

    def loss(self, batch, idx, weights, k: int, adv):
        s, o = self.cfg.sample, self.cfg.optim
        t = self.step_of(idx, k)
        x, x_next = batch.latents[idx, t], batch.latents[idx, t + 1]
        sigma, sigma_next = batch.sigmas[t], batch.sigmas[t + 1]
        cond = index_condition(batch.cond, idx)
        v = self.services.velocity(x, sigma, cond)
        out = sde_step(v, x, sigma, sigma_next, noise_level=s.noise_level, kind=s.kind,
                       prev_sample=x_next, cps_logprob=s.cps_logprob)
        kl = None
        if o.kl_beta > 0:
            with torch.no_grad():
                v_ref = self.services.velocity(x, sigma, cond, reference=True)
            ref = sde_step(v_ref, x, sigma, sigma_next, noise_level=s.noise_level,
                           kind=s.kind, prev_sample=x_next)
            kl = kl_to_reference(out.mean, ref.mean, out.std)
        dev = out.log_prob.device
        log_prob, old, scale = out.log_prob, batch.log_probs[idx, t].to(dev), None
        if o.ratio_norm:
            log_prob = ratio_norm_log_ratio(out.log_prob, old, out.mean, batch.means[idx, t].to(dev), out.std)
            old = torch.zeros_like(log_prob)
            dt = torch.as_tensor(sigma - sigma_next, dtype=torch.float32, device=dev).abs().expand(len(idx))
            scale = 1.0 / dt.clamp(min=1e-20)
        return grpo_loss(log_prob, old, adv.to(dev), o.clip_range, kl, o.kl_beta, weights.to(dev), scale)

"""Flow-GRPO: the clipped ratio of the SDE steps' Gaussian log-probs (+ KL to the reference).

Per trained transition t of a stored trajectory (x_t -> x_{t+1}, log-prob at sampling time):
    ratio = exp(logp_theta - logp_old),  L = mean max(-A ratio, -A clamp(ratio, 1 -+ eps)) + beta KL
with KL = mean_CHW (mu_theta - mu_ref)^2 / (2 std_t^2). The trained transitions are the first
(or a random) `timestep_fraction` of the stochastic ones. Needs stochastic rollouts.
"""

from __future__ import annotations

import torch

from ...models import index_condition
from ...sampling import sde_step
from ..grpo import grpo_loss, kl_to_reference, select_timesteps
from .base import Objective, derived_generator


class RatioObjective(Objective):
    name = "ratio"
    needs_sde = True

    def prepare(self, batch, iteration: int) -> list[int]:
        o = self.cfg.optim
        return select_timesteps(batch.sde_steps, o.timestep_mode, o.timestep_fraction,
                                derived_generator(self.seed, iteration, 5))

    def loss(self, batch, idx, weights, t: int, adv):
        s, o = self.cfg.sample, self.cfg.optim
        x, x_next = batch.latents[idx, t], batch.latents[idx, t + 1]
        cond = index_condition(batch.cond, idx)
        v = self.services.velocity(x, batch.sigmas[t], cond)
        out = sde_step(v, x, batch.sigmas[t], batch.sigmas[t + 1], noise_level=s.noise_level, kind=s.kind,
                       prev_sample=x_next, cps_logprob=s.cps_logprob)
        kl = None
        if o.kl_beta > 0:
            with torch.no_grad():
                v_ref = self.services.velocity(x, batch.sigmas[t], cond, reference=True)
            ref = sde_step(v_ref, x, batch.sigmas[t], batch.sigmas[t + 1], noise_level=s.noise_level,
                           kind=s.kind, prev_sample=x_next)
            kl = kl_to_reference(out.mean, ref.mean, out.std)
        return grpo_loss(out.log_prob, batch.log_probs[idx, t], adv.to(out.log_prob.device), o.clip_range,
                         kl, o.kl_beta, weights.to(out.log_prob.device))

"""Advantage Weighted Matching (arXiv 2509.25050): Flow-GRPO's clipped loss with a
flow-matching surrogate for the log-prob of the whole final sample.

Per draw k (noise level s logit-normal, as pretraining, and noise eps, fresh per image):
    logp = -mean_CHW (v_theta(x_s) - (eps - x0))^2,  x_s = (1 - s) x0 + s eps
    L    = grpo_loss(logp, logp_old, A) + beta mean_CHW (v - v_ref)^2
logp_old is logp itself (detached) with one optimizer step per batch, or the pre-update
surrogates when inner_epochs or optimizer_steps give several. Rollouts may be ODE.
"""

from __future__ import annotations

import torch

from ...models import index_condition
from ..grpo import grpo_loss
from .base import TAG_AWM, Objective, draw_noise, per_sample_mean


class AWMObjective(Objective):
    name = "awm"

    def __init__(self, cfg, policy, services):
        super().__init__(cfg, policy, services)
        self.draws: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # {k: (sigma, noise)} of this update
        self.old: dict[int, torch.Tensor] | None = None  # pre-update surrogates

    def noise(self, batch, iteration: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (sigma, noise) for draw k, from the image's global index."""
        return draw_noise(batch.global_index, batch.latents.shape[2:], self.seed, iteration, TAG_AWM, k)

    def logp(self, batch, idx, k: int, reference: bool = False):
        """The surrogate -||v(x_sigma) - (eps - x0)||^2 (mean over C, H, W) of the final samples
        x0, and the velocity (for the KL term)."""
        sig, eps = self.draws[k]
        x0 = batch.latents[idx, -1]
        sig_i, eps_i = sig[idx].to(x0.device), eps[idx].to(x0.device)
        x_t = (1 - sig_i.view(-1, 1, 1, 1)) * x0 + sig_i.view(-1, 1, 1, 1) * eps_i
        v = self.services.velocity(x_t, sig_i, index_condition(batch.cond, idx), reference=reference).float()
        return -per_sample_mean((v - (eps_i - x0).float()) ** 2), v

    @torch.no_grad()
    def _old_logps(self, batch, steps: list[int]) -> dict[int, torch.Tensor]:
        idx = torch.arange(len(batch.latents))
        n = self.cfg.optim.train_batch_size
        return {k: torch.cat([self.logp(batch, idx[lo:lo + n], k)[0] for lo in range(0, len(idx), n)])
                for k in steps}

    def prepare(self, batch, iteration: int) -> list[int]:
        o = self.cfg.optim
        steps = list(range(o.awm_timesteps))
        self.draws = {k: self.noise(batch, iteration, k) for k in steps}
        several = o.inner_epochs > 1 or o.optimizer_steps > 1
        self.old = self._old_logps(batch, steps) if several else None
        return steps

    def loss(self, batch, idx, weights, k: int, adv):
        o = self.cfg.optim
        logp, v = self.logp(batch, idx, k)
        old = self.old[k][idx] if self.old is not None else logp.detach()
        kl = None
        if o.kl_beta > 0:
            with torch.no_grad():
                _, v_ref = self.logp(batch, idx, k, reference=True)
            kl = per_sample_mean((v - v_ref) ** 2)
        return grpo_loss(logp, old.to(logp.device), adv.to(logp.device), o.clip_range, kl, o.kl_beta,
                         weights.to(logp.device))

"""Supervised flow matching on renderer targets: a calibration tool, not an RL method.

For the batch's prompts, a target provider (targets.PROVIDERS, chosen by the prompt and its
metadata) renders a fresh valid image, seeded from (seed, iteration, global image index), and
encodes it to latents x0; then plain flow matching at fresh (t, eps):
    L = mean_i mean_CHW (v_theta(x_t) - (eps - x0_i))^2  (+ kl_beta mean (v - v_ref)^2)
Rewards and advantages are ignored (they are still computed and logged): it shows how far
the same update budget moves the reward when the model is shown correct images.
"""

from __future__ import annotations

import torch

from .base import TAG_TARGETS, ForwardObjective, derived_generator, masked_mean, per_sample_mean, stats
from .targets import provider_for


class SupervisedObjective(ForwardObjective):
    name = "supervised"
    uses_advantages = False

    def __init__(self, cfg, policy, services):
        super().__init__(cfg, policy, services)
        for item in services.train_items:  # fail before training, not at the first batch
            provider_for(item["prompt"], item["metadata"], cfg.optim.sup_target)

    def clean_samples(self, batch, iteration: int) -> torch.Tensor:
        out = []
        for prompt, meta, gi in zip(batch.prompts, batch.metadata, batch.global_index.tolist()):
            provider = provider_for(prompt, meta, self.cfg.optim.sup_target)
            seed = int(torch.randint(2**62, (1,), generator=derived_generator(self.seed, iteration, TAG_TARGETS, gi)))
            # one image at a time: the encoding does not depend on the batch it comes in
            out.append(provider.latents(self.policy, provider.render(prompt, meta, seed, self.services.resolution)))
        return torch.cat(out).to(batch.latents.device)

    def loss(self, batch, idx, weights, k: int, adv):
        x0, sig, eps, x_t = self.inputs(idx, k)
        v = self.velocity(batch, idx, x_t, sig)
        w = weights.to(v.device)
        fm = masked_mean(per_sample_mean((v - (eps - x0)) ** 2), w)
        kl = masked_mean(self.reference_kl(batch, idx, x_t, sig, v), w) if self.cfg.optim.kl_beta > 0 else None
        return fm + (self.cfg.optim.kl_beta * kl if kl is not None else 0.0), stats(fm, kl)

"""Online reward-filtered fine-tuning (RAFT-style; flow_grpo's "sft" stat-tracker mode):
plain flow matching on the selected rollouts of each group.

    L = sum_i s_i mean_CHW (v_theta(x_t) - (eps - x0_i))^2 / sum_i s_i  (+ kl_beta mean (v - v_ref)^2)
x0_i the rollout's final latent, x_t = (1 - t) x0 + t eps at fresh (t, eps). Selection s_i from
the group's (gathered) advantages: rf_select best = the best image of each group (ties: the
lowest index), above_mean = every image with A > 0; rf_weighted multiplies by max(A, 0).
Groups whose advantages are all equal carry no ranking and select nothing. rf_select all is a
control, not a method: every rollout the trainer keeps (self-training, no reward at all).
"""

from __future__ import annotations

import torch

from .base import ForwardObjective, masked_mean, per_sample_mean, stats

SELECT = ("best", "above_mean", "all")


def selection_weights(adv: torch.Tensor, group_ids: torch.Tensor, select: str = "best",
                      weighted: bool = False) -> torch.Tensor:
    """Per-sample selection weight (0/1, or max(A, 0) when weighted) for a whole gathered batch."""
    if select not in SELECT:
        raise ValueError(f"reward_filtered selection must be one of {SELECT}, got {select!r}")
    adv = adv.double()
    if select == "all":
        return torch.ones_like(adv)
    sel = torch.zeros_like(adv)
    for g in torch.unique(group_ids):
        members = torch.nonzero(group_ids == g).flatten()
        a = adv[members]
        if float(a.max() - a.min()) == 0.0:
            continue
        if select == "best":
            sel[members[int(torch.nonzero(a == a.max()).flatten()[0])]] = 1.0
        else:
            sel[members[a > 0]] = 1.0
    return sel * adv.clamp(min=0) if weighted else sel


def signal_count(adv: torch.Tensor, group_ids: torch.Tensor) -> int:
    """Samples in groups whose advantages are not all equal (those the trainer keeps)."""
    return sum(int((group_ids == g).sum()) for g in torch.unique(group_ids)
               if float(adv[group_ids == g].max() - adv[group_ids == g].min()) != 0.0)


class RewardFilteredObjective(ForwardObjective):
    name = "reward_filtered"

    def prepare(self, batch, iteration: int) -> list[int]:
        o = self.cfg.optim
        if batch.all_advantages is None:
            raise RuntimeError("reward_filtered selects on the gathered advantages: score the batch first")
        sel = selection_weights(batch.all_advantages, batch.all_group_ids, o.rf_select, o.rf_weighted)
        # scaled so the trainer's mean over the kept samples is the selection-weighted mean
        total = float(sel.sum())
        if total > 0 and o.rf_select != "all":
            sel = sel * (signal_count(batch.all_advantages, batch.all_group_ids) / total)
        self.selected = sel[batch.global_index].float()
        self.info = {"rf/selected_share": float((sel > 0).double().mean())}
        return super().prepare(batch, iteration)

    def loss(self, batch, idx, weights, k: int, adv):
        x0, sig, eps, x_t = self.inputs(idx, k)
        v = self.velocity(batch, idx, x_t, sig)
        w = weights.to(v.device)
        fm = masked_mean(self.selected[idx].to(v.device) * per_sample_mean((v - (eps - x0)) ** 2), w)
        kl = masked_mean(self.reference_kl(batch, idx, x_t, sig, v), w) if self.cfg.optim.kl_beta > 0 else None
        return fm + (self.cfg.optim.kl_beta * kl if kl is not None else 0.0), stats(fm, kl)

    def after_iteration(self, iteration: int) -> dict:
        return dict(self.info)

"""DGPO, Direct Group Preference Optimization (arXiv 2510.08425), as its official code
(Luo-Yihong/DGPO, scripts/train_sd3_dgpo.py) trains it.

A DPO over groups instead of pairs: the rollouts of a prompt split by their advantages into a
preferred and a rejected set, and the likelihood of "preferred beats rejected" is raised
directly, so the sampler may be any deterministic ODE solver. Per trained noise level t (the
sampler's first steps, shared by every image; one noise per group) with x_t = (1 - t) x0 + t eps:

    l_i     = mean_CHW (v_theta(x_t) - (eps - x0))^2      the denoising loss of image i
    Delta_i = l_i - l_ref,i                                 (no gradient; ref = the base, or the old copy)
    w_g     = sigmoid(beta / K * sum_{i in g} A_i Delta_i)  one weight per group g of K images
    L       = mean_i w_g(i) A_i l_i + kl_beta mean (v - v_ref)^2

The gradient of L is the gradient of -log sigmoid(R(G+) - R(G-)) with the implicit group
reward R = -beta / K sum A_i Delta_i: groups whose preference is already satisfied (R high)
get small weights. PPO-style clipping (optim.dgpo_clip): with the lagging old copy's loss
l_old, ratio = exp(l_old - l); a sample with A > 0 and ratio > 1 + clip_range, or A < 0 and
ratio < 1 - clip_range, gives no gradient. The old copy follows the trained weights after
every optimizer step, theta_old <- d theta_old + (1 - d) theta, d = min(rate * step, max)
(0.001, 0.3), and samples the rollouts once `dgpo_sample_old_after` steps are done.

The weights w_g need every member's Delta, across micro-batches and processes: they are
computed in `prepare` at the iteration's starting weights (the official computes them inside
each step, at the same weights when an iteration takes one optimizer step, as its recipes do).
"""

from __future__ import annotations

import contextlib

import torch

from ...models import index_condition
from ...parallel import full_tensor
from ..grpo import LossStats
from .base import ForwardObjective, masked_mean, per_sample_mean, swapped_in


def group_weights(delta: torch.Tensor, adv: torch.Tensor, group_ids: torch.Tensor, beta: float,
                  group_size: int, reduce=None, n_groups: int | None = None) -> torch.Tensor:
    """sigmoid(beta / K sum_{i in g} A_i Delta_i) for each sample's group g. `reduce` sums the
    per-group partial sums over processes (a group may span them); None: one process. Every
    process must pass the same `n_groups` (the iteration's groups) for the sums to line up."""
    if n_groups is None:
        n_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    sums = torch.zeros(n_groups, dtype=torch.float64, device=delta.device)
    sums.scatter_add_(0, group_ids.to(delta.device), (adv.double() * beta * delta.double() / group_size))
    if reduce is not None:
        sums = reduce(sums)
    return torch.sigmoid(sums)[group_ids.to(delta.device)].to(delta.dtype)


def clip_mask(loss: torch.Tensor, old_loss: torch.Tensor, adv: torch.Tensor, clip_range: float) -> torch.Tensor:
    """True where the PPO-style clip stops the gradient: ratio = exp(l_old - l) past 1 + clip for
    A > 0 (the sample already fits much better than under the old copy), below 1 - clip for A < 0."""
    ratio = torch.exp(old_loss - loss.detach())
    return torch.where(adv > 0, ratio > 1.0 + clip_range, ratio < 1.0 - clip_range)


def dgpo_loss(loss: torch.Tensor, weight: torch.Tensor, adv: torch.Tensor,
              clipped: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample w A l, the clipped samples' l detached (their value stays, their gradient goes)."""
    if clipped is not None:
        loss = torch.where(clipped, loss.detach(), loss)
    return weight.detach() * adv * loss


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class DGPOObjective(ForwardObjective):
    name = "dgpo"

    def __init__(self, cfg, policy, services):
        super().__init__(cfg, policy, services)
        self.old = [p.detach().clone().float() for p in services.params]  # the lagging copy (ema_ref)
        self.updates = 0  # optimizer steps so far: the old copy's decay clock
        self.info: dict[str, float] = {}

    @classmethod
    def needs_reference(cls, cfg) -> bool:
        return cfg.optim.dgpo_ref == "base" or cfg.optim.kl_beta > 0

    def sampling_context(self):
        after = self.cfg.optim.dgpo_sample_old_after
        if after is not None and self.updates > after:
            return swapped_in(self.services.params, self.old)
        return contextlib.nullcontext()

    def _losses(self, batch, idx, k: int) -> dict[str, torch.Tensor]:
        """No-gradient l, l_ref, l_old (and v_ref for the KL term) of microbatch idx at draw k."""
        o = self.cfg.optim
        x0, sig, eps, x_t = self.inputs(idx, k)
        target = (eps - x0).float()
        cond = index_condition(batch.cond, idx)
        v = self.services.velocity(x_t, sig, cond).float()
        out = {"l": per_sample_mean((v - target) ** 2)}
        need_base = o.dgpo_ref == "base" or o.kl_beta > 0
        if need_base:
            v_ref = self.services.velocity(x_t, sig, cond, reference=True, guidance=o.dgpo_ref_guidance).float()
            out["l_base"] = per_sample_mean((v_ref - target) ** 2)
            if o.kl_beta > 0:
                out["v_ref"] = v_ref
        if o.dgpo_clip or o.dgpo_ref == "old":
            with swapped_in(self.services.params, self.old):
                v_old = self.services.velocity(x_t, sig, cond).float()
            out["l_old"] = per_sample_mean((v_old - target) ** 2)
        return out

    @torch.no_grad()
    def prepare(self, batch, iteration: int) -> list[int]:
        steps = super().prepare(batch, iteration)
        o, s = self.cfg.optim, self.cfg.sample
        if batch.all_advantages is None:
            raise RuntimeError("dgpo weighs groups by the gathered advantages: score the batch first")
        adv = batch.all_advantages[batch.global_index].float()
        n, idx = o.train_batch_size, torch.arange(len(self.x0))
        self.weight, self.l_old, self.v_ref = [], [], []
        shares = []
        for k in steps:
            parts = [self._losses(batch, idx[lo:lo + n], k) for lo in range(0, len(idx), n)]
            cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            ref = cat["l_base"] if o.dgpo_ref == "base" else cat["l_old"]
            w = group_weights(cat["l"] - ref, adv.to(ref.device), batch.group_ids, o.dgpo_beta, s.group_size,
                              _all_reduce_sum, n_groups=s.prompts_per_step)
            self.weight.append(w)
            self.l_old.append(cat.get("l_old"))
            self.v_ref.append(cat.get("v_ref"))
            shares.append(float(w.mean()))
        self.info = {"dgpo/weight_mean": sum(shares) / max(1, len(shares))}
        return steps

    def loss(self, batch, idx, weights, k: int, adv):
        o = self.cfg.optim
        x0, sig, eps, x_t = self.inputs(idx, k)
        v = self.velocity(batch, idx, x_t, sig)
        mask = weights.to(v.device)
        a = adv.to(v.device).float()
        l = per_sample_mean((v - (eps - x0).float()) ** 2)
        clipped = clip_mask(l, self.l_old[k][idx].to(v.device), a, o.clip_range) if o.dgpo_clip else None
        policy = masked_mean(dgpo_loss(l, self.weight[k][idx].to(v.device), a, clipped), mask)
        kl = None
        if o.kl_beta > 0:
            kl = masked_mean(per_sample_mean((v - self.v_ref[k][idx].to(v.device)) ** 2), mask)
        total = policy + (o.kl_beta * kl if kl is not None else 0.0)
        real = mask > 0
        frac = float(clipped[real].float().mean()) if clipped is not None and bool(real.any()) else 0.0
        return total, LossStats(policy_loss=float(policy.detach()), kl=float(kl.detach()) if kl is not None else 0.0,
                                clip_fraction=frac, approx_kl=0.0, max_ratio_dev=0.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        o = self.cfg.optim
        d = min(o.dgpo_old_decay_rate * self.updates, o.dgpo_old_decay_max)
        for q, p in zip(self.old, self.services.params):
            q.copy_(q * d + p.detach().float() * (1.0 - d))
        self.updates += 1

    def after_iteration(self, iteration: int) -> dict:
        # full_tensor: under FSDP2 a sum over shards is a partial sum on each process until reduced
        gap = sum(float(full_tensor(((p.detach().float() - q) ** 2).sum()))
                  for p, q in zip(self.services.params, self.old))
        return {**self.info, "dgpo/old_distance": gap ** 0.5}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"old.{i}": t for i, t in enumerate(self.old)}, "updates": torch.tensor([self.updates])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, t in enumerate(self.old):
            t.copy_(state[f"old.{i}"])
        self.updates = int(state["updates"][0])

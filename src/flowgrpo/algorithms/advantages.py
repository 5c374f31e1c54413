"""Group-relative advantages (GRPO): normalise each image's reward within its prompt group.

A_i = (r_i - mean_group(r)) / (std + eps), std of the group ("group") or of the whole
gathered batch ("global", the SD3 recipes' choice), by default the population std (ddof 0)
as in the Flow-GRPO reference (Pref-GRPO's official code: ddof 1), then clamped to +-clip.
With `batch_renorm` (GDPO, Pref-GRPO's newer code) the advantages are first re-normalised over
the whole batch, A <- (A - mean(A)) / (std(A) + eps) with the same ddof and eps, and then
clamped; groups with no signal stay exactly 0.
Call it on rewards gathered from every process so that a group
spread across processes is normalised once, identically everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class AdvantageStats:
    n_groups: int
    zero_signal_groups: int  # groups whose rewards are all equal: every advantage 0
    reward_std: float  # mean within-group std (the spread normalisation divides by)
    advantage_std: float

    @property
    def zero_signal_share(self) -> float:
        return self.zero_signal_groups / max(1, self.n_groups)


def group_ids_from_prompts(prompts: list[str]) -> torch.Tensor:
    """One id per distinct prompt, in order of first appearance."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(p, len(ids)) for p in prompts], dtype=torch.long)


def batch_renormalize(adv: torch.Tensor, group_ids: torch.Tensor, eps: float, ddof: int) -> torch.Tensor:
    """GDPO: (A - mean(A)) / (std(A) + eps) over the whole (gathered) batch, ddof as the group
    std. Mean and std include every sample (as the official code); a group whose advantages
    are all exactly 0 (no signal) is left at 0, so zero-signal groups are still dropped. Once
    each group's advantages sum to zero the batch mean is 0 and only rounding is removed."""
    a = adv.double()
    std = a.std(correction=ddof) if a.numel() > 1 else a.new_tensor(0.0)
    out = (a - a.mean()) / (std + eps)
    for g in torch.unique(group_ids):
        m = group_ids == g
        if bool((a[m] == 0).all()):
            out[m] = 0.0
    return out.to(adv.dtype)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_mode: str = "group",
                     eps: float = 1e-4, clip: float = 5.0, ddof: int = 0, batch_renorm: bool = False
                     ) -> tuple[torch.Tensor, AdvantageStats]:
    if std_mode not in ("group", "global"):
        raise ValueError(f"std_mode must be 'group' or 'global', got {std_mode!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (unbiased), got {ddof!r}")
    r = rewards.double()
    adv = torch.zeros_like(r)
    global_std = r.std(correction=ddof) if r.numel() > 1 else r.new_tensor(0.0)
    zero, stds = 0, []
    groups = torch.unique(group_ids)
    for g in groups:
        m = group_ids == g
        rg = r[m]
        std = rg.std(correction=ddof) if rg.numel() > 1 else rg.new_tensor(0.0)
        stds.append(float(std))
        if float(rg.max() - rg.min()) == 0.0:
            zero += 1
            continue  # no signal: leave at exactly 0
        denom = (std if std_mode == "group" else global_std) + eps
        adv[m] = (rg - rg.mean()) / denom
    if batch_renorm:
        adv = batch_renormalize(adv, group_ids, eps, ddof)
    adv = adv.clamp(-clip, clip).to(rewards.dtype if rewards.is_floating_point() else torch.float32)
    stats = AdvantageStats(len(groups), zero, float(sum(stds) / max(1, len(stds))), float(adv.std(unbiased=False)))
    return adv, stats


def mix_advantages(parts: dict[str, tuple[torch.Tensor, float]], group_ids: torch.Tensor,
                   clip_after_mix: bool = False, batch_renorm: bool = False, **kw):
    """Pref-GRPO's mixing: sum_k w_k * A_k, each reward normalised within groups on its own.

    Each A_k is clamped to +-clip before mixing (default), or, with `clip_after_mix` as in
    Pref-GRPO's official code, the components stay unclamped and only the sum is clamped.
    `batch_renorm` (GDPO) re-normalises the sum over the batch (batch_renormalize) before
    that final clamp; the official order is: unclamped components, sum, GDPO, clamp.
    """
    clip = kw.pop("clip", 5.0)
    total, stats = None, {}
    for name, (rewards, weight) in parts.items():
        adv, st = group_advantages(rewards, group_ids, clip=math.inf if clip_after_mix else clip, **kw)
        stats[name] = st
        total = weight * adv if total is None else total + weight * adv
    if batch_renorm:
        total = batch_renormalize(total, group_ids, kw.get("eps", 1e-4), kw.get("ddof", 0))
    if clip_after_mix or batch_renorm:
        total = total.clamp(-clip, clip)
    return total, stats

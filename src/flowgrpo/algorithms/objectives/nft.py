"""DiffusionNFT (arXiv 2509.16117), as its official code (NVlabs/DiffusionNFT) trains it.

An "old" copy of the trained weights samples the rollouts; after every iteration it follows
the trained ones, theta_old <- d theta_old + (1 - d) theta, d from a schedule of the optimizer
steps taken so far. Each trained noise level t (the sampler's own sigmas or logit-normal
draws, fresh noise eps per image) gives x_t = (1 - t) x0 + t eps and
    v+ = beta v + (1 - beta) v_old,   v- = (1 + beta) v_old - beta v
    x0hat+- = x_t - t v+-,   w+- = mean |x0hat+- - x0|  (per sample, no gradient, >= 1e-5)
    L = adv_clip * mean[ r mean((x0hat+ - x0)^2 / w+) / beta + (1 - r) mean((x0hat- - x0)^2 / w-) / beta ]
        + kl_w mean (v - v_ref)^2
with the optimality probability r = clamp(A' / adv_clip / 2 + 0.5, 0, 1) (A' the clipped
advantage, transformed by nft_adv_mode). Its optimum is bounded:
v* = v_old + (2r - 1)(u - v_old) / beta with u = eps - x0 (for equal weights w+ = w-).
"""

from __future__ import annotations

import torch

from ...parallel import full_tensor
from .base import ForwardObjective, masked_mean, per_sample_mean, stats, swapped_in

ADV_MODES = ("all", "positive_only", "negative_only", "binary", "one_only")
# decay_type -> (flat steps, rate per step, cap): the official schedules 1 and 2
DECAY_PRESETS = {1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def optimality_probability(adv: torch.Tensor, clip: float, mode: str = "all") -> torch.Tensor:
    """r = clamp(A' / clip / 2 + 0.5, 0, 1), A' = clamp(A, +-clip) then: positive_only keeps
    A' >= 0, negative_only A' <= 0, binary sign(A'), one_only 1 if A' > 0 else 0 (as the official
    code, so binary gives r in {0.5 -+ 1 / (2 clip)} and one_only r in {0.5, 0.5 + 1 / (2 clip)})."""
    a = adv.clamp(-clip, clip)
    if mode == "positive_only":
        a = a.clamp(0, clip)
    elif mode == "negative_only":
        a = a.clamp(-clip, 0)
    elif mode == "binary":
        a = torch.sign(a)
    elif mode == "one_only":
        a = (a > 0).to(a.dtype)
    elif mode != "all":
        raise ValueError(f"nft adv mode must be one of {ADV_MODES}, got {mode!r}")
    return (a / clip / 2.0 + 0.5).clamp(0, 1)


def decay_at(step: int, decay_type: int, constant: float = 0.0, flat: int | None = None,
             rate: float | None = None, cap: float | None = None) -> float:
    """d of theta_old <- d theta_old + (1 - d) theta after `step` optimizer steps. Type 0: the
    constant; 1: min(0.001 step, 0.5); 2: 0 for 75 steps, then min(0.0075 (step - 75), 0.999).
    flat / rate / cap replace a type's constants when given."""
    if decay_type == 0:
        return float(constant)
    if decay_type not in DECAY_PRESETS:
        raise ValueError(f"nft decay type must be 0, 1 or 2, got {decay_type}")
    f, r, c = DECAY_PRESETS[decay_type]
    f, r, c = (f if flat is None else flat), (r if rate is None else rate), (c if cap is None else cap)
    return 0.0 if step < f else min(r * (step - f), c)


def adaptive_weight(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-sample mean |x0_hat - x0| (float64, no gradient, >= 1e-5), shaped to broadcast."""
    with torch.no_grad():
        w = (x0_hat.double() - x0.double()).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    return w.clamp(min=1e-5)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, beta: float, scale: float = 5.0,
             weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample NFT loss (no KL). `weights` = (w+, w-) replaces the adaptive weights (tests)."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v
    x0_pos, x0_neg = x_t - t * v_pos, x_t - t * v_neg
    w_pos, w_neg = weights if weights is not None else (adaptive_weight(x0_pos, x0), adaptive_weight(x0_neg, x0))
    pos = per_sample_mean((x0_pos - x0) ** 2 / w_pos)
    neg = per_sample_mean((x0_neg - x0) ** 2 / w_neg)
    return scale * (r * pos / beta + (1 - r) * neg / beta)


def check_cfg_free(cfg, policy) -> None:
    """NFT regresses the model's own velocity: with classifier-free guidance in the loss it would
    train the guided combination of two branches, which the method does not define (the official
    code trains at guidance 1). Refused unless optim.train_guidance asks for it; embedded
    guidance (FLUX.1-dev, FLUX.2) is one branch and is allowed."""
    from ...config import ConfigError

    s, o = cfg.sample, cfg.optim
    if o.train_guidance is None and s.guidance != 1.0 and not getattr(policy, "guidance_embeds", False):
        raise ConfigError(
            f"optim.policy_loss nft with sample.guidance {s.guidance}: NFT would train classifier-free-guided "
            "velocities (DiffusionNFT trains and samples at guidance 1.0); set sample.guidance: 1.0, or "
            "optim.train_guidance: 1.0 to sample with CFG and train without, or optim.train_guidance: "
            f"{s.guidance} to train guided velocities on purpose")


class NFTObjective(ForwardObjective):
    name = "nft"

    def __init__(self, cfg, policy, services):
        super().__init__(cfg, policy, services)
        check_cfg_free(cfg, policy)
        self.old = [p.detach().clone().float() for p in services.params]  # theta_old (samples the rollouts)
        self.updates = 0  # optimizer steps so far: the decay schedules' clock
        self.info: dict[str, float] = {}

    @classmethod
    def needs_reference(cls, cfg) -> bool:
        return cfg.optim.nft_kl_weight > 0

    def sampling_context(self):
        return swapped_in(self.services.params, self.old)

    def prepare(self, batch, iteration: int) -> list[int]:
        steps = super().prepare(batch, iteration)
        n, idx = self.cfg.optim.train_batch_size, torch.arange(len(self.x0))
        self.v_old = []
        with swapped_in(self.services.params, self.old), self.services.inference():
            for k in steps:
                parts = []
                for lo in range(0, len(idx), n):
                    mb = idx[lo:lo + n]
                    _, sig, _, x_t = self.inputs(mb, k)
                    parts.append(self.velocity(batch, mb, x_t, sig))
                self.v_old.append(torch.cat(parts))
        o = self.cfg.optim
        if getattr(batch, "all_advantages", None) is not None:
            self.info["nft/r_mean"] = float(optimality_probability(batch.all_advantages, o.adv_clip,
                                                                   o.nft_adv_mode).mean())
        return steps

    def loss(self, batch, idx, weights, k: int, adv):
        o = self.cfg.optim
        x0, sig, _, x_t = self.inputs(idx, k)
        v = self.velocity(batch, idx, x_t, sig)
        w = weights.to(v.device)
        r = optimality_probability(adv.to(v.device).float(), o.adv_clip, o.nft_adv_mode)
        policy = masked_mean(nft_loss(v, self.v_old[k][idx].to(v.device), x_t, x0, sig, r, o.nft_beta, o.adv_clip), w)
        kl = masked_mean(self.reference_kl(batch, idx, x_t, sig, v), w) if o.nft_kl_weight > 0 else None
        loss = policy + (o.nft_kl_weight * kl if kl is not None else 0.0)
        return loss, stats(policy, kl)

    def after_optimizer_step(self) -> None:
        self.updates += 1

    @torch.no_grad()
    def after_iteration(self, iteration: int) -> dict:
        o = self.cfg.optim
        d = decay_at(self.updates, o.nft_decay_type, o.nft_decay, o.nft_decay_flat, o.nft_decay_rate, o.nft_decay_max)
        soft_update(self.old, self.services.params, d)
        # full_tensor: under FSDP2 a sum over shards is a partial sum on each process until reduced
        gap = sum(float(full_tensor(((p.detach().float() - q) ** 2).sum()))
                  for p, q in zip(self.services.params, self.old))
        return {**self.info, "nft/decay": d, "nft/old_distance": gap ** 0.5}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"old.{i}": t for i, t in enumerate(self.old)}, "updates": torch.tensor([self.updates])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, t in enumerate(self.old):
            t.copy_(state[f"old.{i}"])
        self.updates = int(state["updates"][0])


@torch.no_grad()
def soft_update(old: list[torch.Tensor], params, decay: float) -> None:
    """theta_old <- d theta_old + (1 - d) theta (in place)."""
    for q, p in zip(old, params):
        q.copy_(q * decay + p.detach().float() * (1.0 - decay))

"""GRPO: group-relative advantages and the clipped policy loss. The training objectives the
trainer dispatches to (optim.policy_loss) live in algorithms/objectives/, one module each."""

from .advantages import AdvantageStats, batch_renormalize, group_advantages, group_ids_from_prompts, mix_advantages
from .grpo import (EMA, LossStats, candidate_steps, grpo_loss, kl_to_reference, ratio_norm_log_ratio,
                   select_timesteps, select_timesteps_per_sample)

__all__ = ["AdvantageStats", "EMA", "LossStats", "batch_renormalize", "candidate_steps", "group_advantages",
           "group_ids_from_prompts", "grpo_loss", "kl_to_reference", "mix_advantages", "ratio_norm_log_ratio",
           "select_timesteps", "select_timesteps_per_sample"]

"""GRPO: group-relative advantages and the clipped policy loss. The training objectives the
trainer dispatches to (optim.policy_loss) live in algorithms/objectives/, one module each."""

from .advantages import AdvantageStats, group_advantages, group_ids_from_prompts, mix_advantages
from .grpo import EMA, LossStats, grpo_loss, kl_to_reference, select_timesteps

__all__ = ["AdvantageStats", "EMA", "LossStats", "group_advantages", "group_ids_from_prompts", "grpo_loss",
           "kl_to_reference", "mix_advantages", "select_timesteps"]

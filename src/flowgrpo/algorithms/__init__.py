"""GRPO: group-relative advantages and the clipped policy loss."""

from .advantages import AdvantageStats, group_advantages, group_ids_from_prompts, mix_advantages
from .grpo import EMA, LossStats, grpo_loss, kl_to_reference, select_timesteps

__all__ = ["AdvantageStats", "EMA", "LossStats", "group_advantages", "group_ids_from_prompts", "grpo_loss",
           "kl_to_reference", "mix_advantages", "select_timesteps"]

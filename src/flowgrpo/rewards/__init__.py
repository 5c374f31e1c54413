"""Rewards: pointwise, pairwise, adversarial and remote, all behind one call (see base.py)."""

from .base import Reward, RewardError, RewardOutput, as_uint8_images, available_rewards, make_reward, register

__all__ = ["Reward", "RewardError", "RewardOutput", "as_uint8_images", "available_rewards", "make_reward", "register"]

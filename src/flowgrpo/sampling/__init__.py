"""SDE/ODE sampling for flow models: one pure step function and a rollout loop."""

from .rollout import JUDGED_IMAGES, Trajectory, initial_noise, randn_like_batch, rollout, sde_mask
from .step import KINDS, StepOutput, gaussian_log_prob, sde_step, step_std

__all__ = ["JUDGED_IMAGES", "KINDS", "StepOutput", "Trajectory", "gaussian_log_prob", "initial_noise",
           "randn_like_batch", "rollout", "sde_mask", "sde_step", "step_std"]

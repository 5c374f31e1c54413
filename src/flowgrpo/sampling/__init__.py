"""SDE/ODE sampling for flow models: pure step functions (SDE, Euler, DPM-Solver++(2M)) and a rollout loop."""

from .dpm import compressed_tail, dpm2_step
from .rollout import (AFTER_WINDOW, JUDGED_IMAGES, SAMPLERS, Trajectory, Window, initial_noise, randn_like_batch,
                      rollout, sde_mask, window_start)
from .step import KINDS, StepOutput, gaussian_log_prob, sde_step, step_std

__all__ = ["AFTER_WINDOW", "JUDGED_IMAGES", "KINDS", "SAMPLERS", "StepOutput", "Trajectory", "Window",
           "compressed_tail", "dpm2_step", "gaussian_log_prob", "initial_noise", "randn_like_batch", "rollout",
           "sde_mask", "sde_step", "step_std", "window_start"]

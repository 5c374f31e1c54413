"""The one small protocol every model backend implements.

The trainer, the sampler and the evaluators talk to a model only through this. A text
condition is a dict of tensors whose first dimension is the batch (so it can be sliced,
concatenated, cached to safetensors and moved between devices without knowing the model).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

import torch

Condition = dict[str, torch.Tensor]


def index_condition(cond: Condition, idx) -> Condition:
    return {k: v[idx] for k, v in cond.items()}


@runtime_checkable
class Policy(Protocol):
    """A text-to-image flow model that GRPO can sample from and train."""

    transformer: torch.nn.Module  # the denoiser being trained (what accelerate prepares)
    device: torch.device

    def encode_prompts(self, prompts: list[str]) -> Condition:
        """Text condition for each prompt (no gradient; cacheable)."""

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one initial-noise tensor (without batch)."""

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """num_steps + 1 noise levels from 1 down to 0, shifted as the model's scheduler does."""

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Condition,
                 negative: Condition | None = None, guidance: float = 1.0,
                 uncond_grad: bool = False) -> torch.Tensor:
        """Predicted velocity, classifier-free guided when `negative` is given and guidance != 1
        (`guided`: the gradient flows through the unconditional branch only with `uncond_grad`)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], shape (B, 3, H, W), float32."""

    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which `velocity` runs the frozen reference model (for the KL term)."""

    def load_lora(self, folder: str | Path, scale: float = 1.0) -> None:
        """Apply a saved LoRA folder for sampling (evaluation of a trained run)."""

    def save_trained(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the trained weights (a LoRA folder loadable by diffusers, or a full model);
        `state`: the gathered `trained_state()` of a sharded model."""

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors `save_trained` writes (sharded ones under FSDP2)."""

    def shard_units(self, module: torch.nn.Module | None = None) -> list[torch.nn.Module]:
        """The transformer's blocks: one FSDP2 sharding unit each."""


def guided(uncond: torch.Tensor, text: torch.Tensor, guidance: float, uncond_grad: bool = False) -> torch.Tensor:
    """Classifier-free guidance, uncond + g (text - uncond). Without `uncond_grad` the
    unconditional branch is detached, as the Flow-GRPO reference trains (train_sd3.py): the
    values are the same, only a loss's gradient differs (it reaches the weights through the
    conditional branch alone, scaled by g, instead of g through one and 1 - g through the other)."""
    if not uncond_grad:
        uncond = uncond.detach()
    return uncond + guidance * (text - uncond)


@contextlib.contextmanager
def adapters_disabled(module) -> Iterator[None]:
    """Run a peft-adapted diffusers model without its LoRA (the reference for LoRA training)."""
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()

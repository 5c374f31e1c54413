"""Target providers for the supervised objective: clean latents rendered for a prompt.

A provider renders a fresh valid image for a (prompt, metadata) pair from a seed and encodes
it to the policy's latents. The supervised objective knows only this registry: a world with
a renderer plugs in by adding itself to PROVIDERS.
"""

from __future__ import annotations

import numpy as np
import torch

from ...config import ConfigError


class ShapesTargets:
    """The shapes world's renderer: a random scene satisfying the GenEval record (the metadata,
    or the record parsed from the prompt), encoded with the model's VAE as pretraining does."""

    name = "shapes"

    def _record(self, prompt: str, metadata: dict | None) -> dict:
        from ...worlds.shapes.grammar import parse_prompt, validate_record

        rec = metadata if isinstance(metadata, dict) and "include" in metadata else parse_prompt(prompt)
        return validate_record(rec)

    def reason_rejected(self, prompt: str, metadata: dict | None) -> str | None:
        """None when this provider can render the prompt, else why not."""
        try:
            self._record(prompt, metadata)
        except ValueError as exc:
            return str(exc)
        return None

    def render(self, prompt: str, metadata: dict | None, seed: int, size: int) -> np.ndarray:
        from ...worlds.shapes.render import render

        return render(self._record(prompt, metadata), np.random.default_rng(seed), size)

    @torch.no_grad()
    def latents(self, policy, image: np.ndarray) -> torch.Tensor:
        """(1, C, h, w) latents of one HxWx3 uint8 image: the pretraining encode path."""
        from ...worlds.shapes.pretrain import _to_tensor

        vae = policy.pipe.vae
        x = _to_tensor(np.array(image[None])).to(policy.device, vae.dtype)  # a writable copy
        if hasattr(policy, "encode_images"):  # a latent layout of its own (Qwen-Image, FLUX.2)
            return policy.encode_images(x).float()
        shift = vae.config.shift_factor or 0.0
        return ((vae.encode(x).latent_dist.mode() - shift) * vae.config.scaling_factor).float()


PROVIDERS = {"shapes": ShapesTargets()}


def provider_for(prompt: str, metadata: dict | None, name: str = "auto"):
    """The provider named `name`, or with "auto" the first that renders this prompt."""
    if name != "auto" and name not in PROVIDERS:
        raise ConfigError(f"optim.sup_target: unknown target provider {name!r}; known: auto, {', '.join(PROVIDERS)}")
    candidates = list(PROVIDERS.values()) if name == "auto" else [PROVIDERS[name]]
    reasons = []
    for p in candidates:
        why = p.reason_rejected(prompt, metadata)
        if why is None:
            return p
        reasons.append(f"{p.name}: {why}")
    raise ConfigError(f"policy_loss supervised: no target provider renders the prompt {prompt!r} "
                     f"({'; '.join(reasons)}). Supervised targets exist only for prompts of a world with a "
                     f"renderer (e.g. data.train=shapes:train)")

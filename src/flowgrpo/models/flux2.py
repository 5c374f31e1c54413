"""FLUX.2 [dev] (`Flux2Pipeline`) behind the Policy protocol.

Text. The pipeline's own `encode_prompt`: the prompt in Mistral-3's chat template with FLUX.2's
system message, padded to `max_sequence_length` tokens (512), and the hidden states of layers
10, 20 and 30 of the text encoder concatenated per token (3 x 5,120 = 15,360 for
Mistral-Small-3.1). The condition dict is {"prompt_embeds": (B, L, 3D)}; padding tokens are
attended to, as in the pipeline, so there is no mask.

Latents. The VAE latent (C, H/f, W/f), f = 2 ** (len(vae.block_out_channels) - 1), is
"patchified" (every 2x2 patch stacked into 4C channels) and normalised by the VAE's batch-norm
statistics before the transformer sees it; the pipeline draws its noise directly in that
patchified, normalised space. This policy keeps that layout: `latent_shape` is
(4C, H/2f, W/2f), so a seed gives the pipeline's noise, and `velocity` only flattens the grid
into tokens, row-major (transformer input (B, H/2f * W/2f, 4C)), and back.

Positions. Four axes (t, h, w, l): image tokens (0, row, col, 0), text tokens (0, 0, 0, l).
The transformer takes them without a batch dimension, so they are built in `velocity` and the
condition dict stays batch-first.

Guidance. FLUX.2 [dev] is guidance-distilled: the value (4.0 on the model card) goes in as an
embedding, one forward pass; a negative condition is ignored (the pipeline has no true CFG).

Noise levels. s_i = linspace(1, 1/N, N) shifted by the scheduler with FLUX.2's empirical mu,
which depends on the number of image tokens *and* the number of steps
(`diffusers.pipelines.flux2.pipeline_flux2.compute_empirical_mu`, the pipeline's own
function). `shift` replaces it by the static rule s' = shift s / (1 + (shift - 1) s).

Decode. De-normalise with the batch-norm statistics (z * sqrt(var + eps) + mean), undo the
2x2 patchify, decode. `encode_images` is the inverse, as the pipeline encodes reference images
(the mode, patchify, (z - mean) / sqrt(var + eps)).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .base import Condition
from .diffusers_policy import DiffusersPolicy

# Double-stream blocks: both streams' attention projections and feed-forward layers. Single-stream
# blocks fuse q/k/v and the MLP input into one projection and its outputs into one: both are targeted
# (the single blocks' output layer by full name: "attn.to_out" alone would also name the double
# blocks' ModuleList).
FLUX2_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                      "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                      "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                      "attn.to_qkv_mlp_proj"]

# FLUX.2 [dev] model card: 1,024 px, guidance 4.0, 50 steps; the pipeline's text length 512.
FLUX2_SAMPLE_DEFAULTS = {"resolution": 1024, "guidance": 4.0, "steps": 50, "max_sequence_length": 512}


def encode_text(pipe, prompts: list[str], max_sequence_length: int, device) -> Condition:
    """The pipeline's own prompt encoding (text ids are rebuilt in `velocity`)."""
    emb, _ = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_sequence_length)
    return {"prompt_embeds": emb}


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h * w, C), row-major."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def untokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `tokens`."""
    b, _, c = x.shape
    return x.permute(0, 2, 1).reshape(b, c, h, w)


def grid_ids(h: int, w: int, device) -> torch.Tensor:
    """(h * w, 4) ids (0, row, col, 0) of the image tokens."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, cols, zeros], 1).to(device)


def text_ids(n: int, device) -> torch.Tensor:
    """(n, 4) ids (0, 0, 0, l) of the text tokens."""
    ids = torch.zeros(n, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(n)
    return ids.to(device)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w): channel 4c + 2i + j goes to pixel (2y + i, 2x + j) of channel c."""
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpatchify`: (B, C, 2h, 2w) -> (B, 4C, h, w)."""
    b, c, h2, w2 = x.shape
    x = x.reshape(b, c, h2 // 2, 2, w2 // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h2 // 2, w2 // 2)


class Flux2Policy(DiffusersPolicy):
    """A `Flux2Pipeline` as a GRPO policy (text, layout, ids, guidance and sigmas in the module docstring)."""

    block_attrs = ("transformer_blocks", "single_transformer_blocks")  # double- and single-stream
    lora_targets = FLUX2_LORA_TARGETS
    pipeline_class_name = "Flux2Pipeline"
    default_max_sequence_length = FLUX2_SAMPLE_DEFAULTS["max_sequence_length"]
    published_defaults = FLUX2_SAMPLE_DEFAULTS
    text_encoder_attrs = ("text_encoder",)
    guidance_embeds = True  # guidance is an input of the one forward pass, never a second branch

    def add_lora(self, spec) -> None:
        """The default targets plus each single-stream block's output layer, named in full."""
        if not spec.targets:
            singles = [f"single_transformer_blocks.{i}.attn.to_out"
                       for i in range(len(self.transformer.single_transformer_blocks))]
            spec = copy.copy(spec)
            spec.targets = [*self.lora_targets, *singles]
        super().add_lora(spec)

    # ---- the protocol ----------------------------------------------------------------
    def condition_dims(self) -> dict[str, int]:
        return {"prompt_embeds": self.transformer.config.joint_attention_dim}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * 2  # the VAE's downsampling, then the 2x2 patchify
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this FLUX.2 model, got {height}x{width}")
        return (self.transformer.config.in_channels, height // f, width // f)

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        sched = self.sampling_scheduler()
        base = None if sched.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        kw = {}
        if sched.config.use_dynamic_shifting:
            f = self.vae_scale_factor * 2
            kw["mu"] = compute_empirical_mu((height // f) * (width // f), num_steps)
        sched.set_timesteps(num_steps, device="cpu", sigmas=base, **kw)
        return sched.sigmas.float()

    def velocity(self, latents, sigma, cond, negative=None, guidance: float = 1.0,
                 uncond_grad: bool = False) -> torch.Tensor:
        # embedded guidance: one pass, no unconditional branch for uncond_grad to act on
        b, _, h, w = latents.shape
        x = tokens(latents.to(self.dtype))
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        sig = sig.expand(b) if sig.ndim == 0 else sig
        emb = cond["prompt_embeds"]
        g = torch.full((b,), float(guidance), dtype=torch.float32, device=x.device)
        t = (sig * 1000).to(self.dtype) / 1000  # the pipeline's rounding of t = 1000 sigma
        out = self.forward_module(hidden_states=x, timestep=t, guidance=g, encoder_hidden_states=emb.to(self.dtype),
                                  txt_ids=text_ids(emb.shape[1], x.device), img_ids=grid_ids(h, w, x.device),
                                  return_dict=False)[0]
        return untokens(out[:, :h * w], h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents.to(self.device, vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        z = unpatchify(z * std + mean)
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> patchified, normalised latents (B, 4C, H/2f, W/2f), the VAE's mode."""
        vae = self.pipe.vae
        z = patchify(vae.encode(images.to(self.device, vae.dtype)).latent_dist.mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        return (z - mean) / std

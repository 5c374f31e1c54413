"""FLUX.1 (dev, schnell and fine-tunes such as FLUX.1-dev-PrefGRPO) behind the Policy protocol.

Latents. FLUX's transformer works on *packed* latents: every 2x2 patch of the VAE latent
(C, H/f, W/f), f = the VAE's downsampling, becomes one token of 4C channels. This policy
keeps the *unpacked* layout everywhere outside `velocity`: `latent_shape` is (C, H/f, W/f),
initial noise is drawn in that shape (so a seed gives the same noise as `FluxPipeline`),
trajectories are stored unpacked and `decode` takes them as they are. Packing is a
permutation, so the per-element Gaussian log-density (a mean over all elements) is the same
in either layout. `velocity` packs, runs the transformer, and unpacks.

Positions. Image tokens carry ids (0, row, col) on the packed grid; text tokens carry
ids 0. diffusers takes `txt_ids` without a batch dimension, so the condition dict holds
only batch-first tensors (prompt_embeds (B, L, D), pooled_projections (B, P)) and the text
ids are rebuilt in `velocity` from L.

Guidance. FLUX.1-dev is guidance-distilled: the guidance value g goes into the transformer
as an embedding, one forward pass, no unconditional branch (a negative condition is
ignored). Models without a guidance embedding (schnell) use true CFG
v = v_u + g (v_c - v_u) when a negative condition is given and g != 1.

Noise levels. `sigmas` follows FluxPipeline: s_i = linspace(1, 1/N, N), then with dynamic
shifting s' = e^mu / (e^mu + 1/s - 1), where mu = a + b * n_tokens interpolates linearly from
base_shift at base_image_seq_len tokens to max_shift at max_image_seq_len tokens (the
scheduler config's values; 0.5 @ 256 to 1.15 @ 4096 for FLUX.1-dev), n_tokens =
(H/2f)(W/2f). With `shift` set (Pref-GRPO trains with 3) the static rule
s' = shift s / (1 + (shift - 1) s) is used instead. A final 0 is appended.
"""

from __future__ import annotations



import numpy as np
import torch

from .base import guided
from .diffusers_policy import DiffusersPolicy
from .sd3 import ModelLoadError

# The Flow-GRPO FLUX targets: the SD3 attention projections (which in FLUX also name the
# single-stream blocks' q/k/v) plus both streams' feed-forward layers.
FLUX_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

# FLUX.1-dev model card settings (FLUX.1-dev-PrefGRPO's quick start uses the same).
FLUX_SAMPLE_DEFAULTS = {"resolution": 1024, "guidance": 3.5, "steps": 50, "max_sequence_length": 512}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, channels-major inside."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent of `height` x `width`."""
    b, _, d = x.shape
    x = x.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """(h2 * w2, 3) ids (0, row, col) of the packed image tokens."""
    rows = torch.arange(h2).repeat_interleave(w2)
    cols = torch.arange(w2).repeat(h2)
    return torch.stack([torch.zeros_like(rows), rows, cols], 1).to(device=device, dtype=dtype)


def flux_mu(image_seq_len: int, config) -> float:
    """FluxPipeline's resolution-dependent shift: linear in the number of image tokens."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (top - base) / (max_len - base_len)
    return image_seq_len * slope + base - slope * base_len


def place_pipeline(pipe, device, cpu_offload: bool) -> torch.device:
    """Move the pipeline to `device`, or let diffusers keep each component on the CPU until it runs.

    Returns the device inputs must be on (the accelerator in both cases)."""
    if cpu_offload:
        dev = torch.device(device)
        if dev.type == "cpu":
            raise ModelLoadError("--cpu-offload needs an accelerator (it moves each model to the GPU only while it "
                                 "runs); drop it to run on the CPU")
        pipe.enable_model_cpu_offload(device=dev)
        return pipe._execution_device
    pipe.to(device)
    return torch.device(device)


class FluxPolicy(DiffusersPolicy):
    """A `FluxPipeline` as a GRPO policy (layout, guidance and sigma rules in the module docstring)."""

    block_attrs = ("transformer_blocks", "single_transformer_blocks")  # double- and single-stream
    lora_targets = FLUX_LORA_TARGETS
    pipeline_class_name = "FluxPipeline"
    default_max_sequence_length = FLUX_SAMPLE_DEFAULTS["max_sequence_length"]
    published_defaults = FLUX_SAMPLE_DEFAULTS
    text_encoder_attrs = ("text_encoder", "text_encoder_2")

    # ---- the protocol ----------------------------------------------------------------
    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def condition_dims(self) -> dict[str, int]:
        """Last dimension of each condition tensor the transformer accepts."""
        cfg = self.transformer.config
        return {"prompt_embeds": cfg.joint_attention_dim, "pooled_projections": cfg.pooled_projection_dim}


    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * 2  # the VAE's downsampling, then 2x2 packing
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this FLUX model, got {height}x{width}")
        return (self.transformer.config.in_channels // 4, height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        sched = self.sampling_scheduler()
        base = None if sched.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        kw = {}
        if sched.config.use_dynamic_shifting:
            n_tokens = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
            kw["mu"] = flux_mu(n_tokens, sched.config)
        sched.set_timesteps(num_steps, device="cpu", sigmas=base, **kw)
        return sched.sigmas.float()

    def velocity(self, latents, sigma, cond, negative=None, guidance: float = 1.0,
                 uncond_grad: bool = False) -> torch.Tensor:
        b, _, h, w = latents.shape
        true_cfg = not self.guidance_embeds and negative is not None and guidance != 1.0
        x = pack_latents(latents.to(self.dtype))
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        sig = sig.expand(b) if sig.ndim == 0 else sig
        emb, pooled = cond["prompt_embeds"], cond["pooled_projections"]
        if true_cfg:
            x, sig = torch.cat([x, x]), torch.cat([sig, sig])
            emb = torch.cat([negative["prompt_embeds"], emb])
            pooled = torch.cat([negative["pooled_projections"], pooled])
        n = x.shape[0]
        g = torch.full((n,), float(guidance), dtype=torch.float32, device=x.device) if self.guidance_embeds else None
        # FluxPipeline rounds t = 1000 sigma to the model dtype before dividing: do the same
        # so that bf16 runs see the timesteps the model was used with.
        t = (sig * 1000).to(self.dtype) / 1000
        out = self.forward_module(
            hidden_states=x, timestep=t, guidance=g, pooled_projections=pooled.to(self.dtype),
            encoder_hidden_states=emb.to(self.dtype),
            txt_ids=torch.zeros(emb.shape[1], 3, device=x.device, dtype=self.dtype),
            img_ids=image_ids(h // 2, w // 2, x.device, self.dtype), return_dict=False)[0]
        if true_cfg:
            uncond, text = out.chunk(2)
            out = guided(uncond, text, guidance, uncond_grad)
        return unpack_latents(out, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents.to(self.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

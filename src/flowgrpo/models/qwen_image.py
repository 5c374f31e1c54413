"""Qwen-Image (`QwenImagePipeline`: Qwen-Image and its fine-tunes) behind the Policy protocol.

Text. The prompt goes through the pipeline's own `encode_prompt`: the chat template wrapped
around it, Qwen2.5-VL's last hidden states, the template's first 34 tokens dropped, the rest
cut at `max_sequence_length`. The lengths differ between prompts, so the condition dict holds
the embeddings zero-padded to `max_sequence_length` and the mask of real tokens:
  prompt_embeds (B, L, D), prompt_embeds_mask (B, L) (1 = token, 0 = padding).
Fixed shapes let the trainer stack prompts encoded one at a time and the embedding cache store
rows. `velocity` trims the batch back to its longest prompt and passes the mask to the
transformer only when some row is padded, as the pipeline does (padded text tokens are masked
out of the attention; their RoPE positions come after every real token's, so trimming or
padding does not move a real token).

Latents. Kept unpacked, (C, H/f, W/f) with f = 2 ** len(vae.temperal_downsample): the noise a
seed gives in that shape is the noise `QwenImagePipeline` draws for the same seed (its extra
frame axis has size 1). `velocity` packs 2x2 patches into tokens, passes `img_shapes`
[(1, H/2f, W/2f)] per image, and unpacks.

Guidance. True CFG as the pipeline does it, when a negative condition is given and the scale
g != 1: v = v_u + g (v_c - v_u), then every token's velocity rescaled to the norm of its
conditional velocity, v * |v_c| / |v| (norms over the packed channels). The two halves run as
one batch (padded to the longer of the two with the mask). The pipeline's negative prompt is
whatever the caller gives (the model card uses " "); flowgrpo's trainer uses "".

Noise levels. s_i = linspace(1, 1/N, N), then the scheduler's resolution-dependent shift with
mu linear in the number of packed image tokens (Qwen-Image: 0.5 at 256 tokens to 0.9 at 8,192,
exponential time shift, stretched to the terminal value 0.02), computed by the scheduler
itself; `shift` replaces it by the static rule as for FLUX.1.

Decode. The VAE works on (B, C, 1, H, W); latents are de-normalised with the VAE config's
per-channel latents_mean / latents_std (z * std + mean) before decoding. `encode_images` is the
inverse, as QwenImageImg2ImgPipeline encodes (the mode, (z - mean) / std).
"""

from __future__ import annotations


import numpy as np
import torch

from .base import Condition, guided
from .diffusers_policy import DiffusersPolicy
from .flux import flux_mu, pack_latents, unpack_latents
from .sd3 import ModelLoadError

# Both streams' attention projections and both streams' MLPs (img_mlp / txt_mlp).
QWEN_IMAGE_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                           "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]

# Qwen-Image model card: 1,328 px square, 50 steps, true_cfg_scale 4.0; the pipeline's text length 512.
QWEN_IMAGE_SAMPLE_DEFAULTS = {"resolution": 1328, "guidance": 4.0, "steps": 50, "max_sequence_length": 512}


def encode_text(pipe, prompts: list[str], max_sequence_length: int, device) -> Condition:
    """The pipeline's own prompt encoding, padded to `max_sequence_length` with its mask."""
    emb, mask = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_sequence_length)
    b, n, d = emb.shape
    if mask is None:  # the pipeline drops an all-ones mask
        mask = torch.ones(b, n, dtype=torch.long, device=emb.device)
    pad = max_sequence_length - n
    if pad > 0:
        emb = torch.cat([emb, emb.new_zeros(b, pad, d)], 1)
        mask = torch.cat([mask, mask.new_zeros(b, pad)], 1)
    return {"prompt_embeds": emb, "prompt_embeds_mask": mask.long()}


def trim_text(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut a padded batch to its longest prompt; mask None when no row is padded (as the pipeline)."""
    valid = mask.bool()
    cols = torch.nonzero(valid.any(0))
    n = int(cols.max()) + 1 if len(cols) else 1
    emb, valid = emb[:, :n], valid[:, :n]
    return emb, (None if bool(valid.all()) else valid)


class QwenImagePolicy(DiffusersPolicy):
    """A `QwenImagePipeline` as a GRPO policy (text, layout, guidance and sigma rules in the module docstring)."""

    lora_targets = QWEN_IMAGE_LORA_TARGETS
    pipeline_class_name = "QwenImagePipeline"
    default_max_sequence_length = QWEN_IMAGE_SAMPLE_DEFAULTS["max_sequence_length"]
    published_defaults = QWEN_IMAGE_SAMPLE_DEFAULTS
    text_encoder_attrs = ("text_encoder",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.transformer.config.guidance_embeds:
            raise ModelLoadError("this Qwen-Image transformer has a guidance embedding; flowgrpo's Qwen-Image "
                                 "backend supports the released (true-CFG) models only")

    # ---- the protocol ----------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.pipe.vae.temperal_downsample)

    def condition_dims(self) -> dict[str, int]:
        """Last dimension of each condition tensor the transformer accepts (the mask's is the length)."""
        return {"prompt_embeds": self.transformer.config.joint_attention_dim}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor * 2  # the VAE's downsampling, then 2x2 packing
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this Qwen-Image model, "
                             f"got {height}x{width}")
        return (self.transformer.config.in_channels // 4, height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        sched = self.sampling_scheduler()
        kw = {}
        if sched.config.use_dynamic_shifting:
            n_tokens = (height // (self.vae_scale_factor * 2)) * (width // (self.vae_scale_factor * 2))
            kw["mu"] = flux_mu(n_tokens, sched.config)
        sched.set_timesteps(num_steps, device="cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps), **kw)
        return sched.sigmas.float()

    def velocity(self, latents, sigma, cond, negative=None, guidance: float = 1.0,
                 uncond_grad: bool = False) -> torch.Tensor:
        b, _, h, w = latents.shape
        true_cfg = negative is not None and guidance != 1.0
        x = pack_latents(latents.to(self.dtype))
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        sig = sig.expand(b) if sig.ndim == 0 else sig
        emb, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        if true_cfg:
            x, sig = torch.cat([x, x]), torch.cat([sig, sig])
            emb = torch.cat([emb, negative["prompt_embeds"].to(emb.device)])
            mask = torch.cat([mask, negative["prompt_embeds_mask"].to(mask.device)])
        emb, mask = trim_text(emb, mask)
        # the pipeline rounds t = 1000 sigma to the model dtype before dividing
        t = (sig * 1000).to(self.dtype) / 1000
        out = self.forward_module(hidden_states=x, timestep=t, encoder_hidden_states=emb.to(self.dtype),
                                  encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0],
                                  return_dict=False)[0]
        if true_cfg:
            text, uncond = out.chunk(2)
            comb = guided(uncond, text, guidance, uncond_grad)
            out = comb * (torch.norm(text, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return unpack_latents(out, h, w)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents.to(self.device, vae.dtype).unsqueeze(2)  # (B, C, 1, H, W): one frame
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        z = z / inv_std + mean  # as the pipeline writes it (z * std + mean up to rounding)
        return (vae.decode(z, return_dict=False)[0][:, :, 0].float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, C, H/f, W/f), the VAE's mode."""
        vae = self.pipe.vae
        z = vae.encode(images.to(self.device, vae.dtype).unsqueeze(2)).latent_dist.mode()[:, :, 0]
        shape = (1, vae.config.z_dim, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        return (z - mean) * inv_std

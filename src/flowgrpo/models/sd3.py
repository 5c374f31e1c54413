"""Stable Diffusion 3 / 3.5 (and the tiny shapes model, which is an SD3) behind the Policy protocol."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import Condition, guided
from .diffusers_policy import DiffusersPolicy

# Attention projections of both MMDiT streams: the Flow-GRPO reference's LoRA targets.
SD3_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
DEFAULTS_FILE = "flowgrpo_defaults.json"  # optional per-model defaults shipped beside model_index.json


class ModelLoadError(RuntimeError):
    """A model id or folder that cannot be loaded, with what to do about it."""


@dataclass
class LoraSpec:
    rank: int = 32
    alpha: int = 64
    init: str = "gaussian"  # peft init_lora_weights; gaussian as in the reference
    targets: list[str] = field(default_factory=list)  # empty: the model's default targets
    dropout: float = 0.0


def model_defaults(model: str) -> dict:
    p = Path(model) / DEFAULTS_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def check_model_path(model: str) -> None:
    p = Path(model)
    # "org/name" is a hub id unless its first part is a local folder (e.g. assets/shapes-sd3)
    looks_local = (model.startswith((".", "/", "~")) or p.exists() or model.count("/") != 1
                   or Path(p.parts[0]).is_dir())
    if looks_local and not (p / "model_index.json").is_file():
        if not p.exists():
            raise ModelLoadError(f"model folder {model!r} does not exist; pass a diffusers folder or a hub id "
                                 f"such as stabilityai/stable-diffusion-3.5-medium")
        raise ModelLoadError(f"{model!r} is not a diffusers pipeline folder (no model_index.json)")


def load_pipeline(pipeline_cls, model: str, dtype: torch.dtype, **kwargs):
    from ..hf_quiet import diffusers_dtype_key

    check_model_path(model)
    index = Path(model) / "model_index.json"
    if index.is_file():
        # Components saved as null (e.g. no T5) must be passed as None explicitly.
        for name, spec in json.loads(index.read_text()).items():
            if isinstance(spec, list) and spec == [None, None]:
                kwargs.setdefault(name, None)
    try:
        return pipeline_cls.from_pretrained(model, **{diffusers_dtype_key(): dtype}, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {model!r}: {str(exc).splitlines()[0]} "
                             f"(offline? download it first with `huggingface-cli download {model}`)") from exc


class SD3Policy(DiffusersPolicy):
    """A `StableDiffusion3Pipeline` as a GRPO policy: true CFG with negative prompt ""."""

    lora_targets = SD3_LORA_TARGETS
    pipeline_class_name = "StableDiffusion3Pipeline"
    default_max_sequence_length = 256
    text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")

    # ---- the protocol ----------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Condition:
        if self.encoder is not None:
            return self.encoder(prompts, device=self.device)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    def default_resolution(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    def sample_defaults(self) -> dict:
        """resolution, guidance and max_sequence_length for `flowgrpo sample`, then the folder's own
        defaults (SD3.5's eval setting is 40 steps: pass --steps 40)."""
        return {"resolution": self.default_resolution(), "guidance": 4.5,
                "max_sequence_length": self.max_sequence_length, **self.defaults}

    def condition_dims(self) -> dict[str, int]:
        """Last dimension of each condition tensor the transformer accepts."""
        cfg = self.transformer.config
        return {"prompt_embeds": cfg.joint_attention_dim, "pooled_projections": cfg.pooled_projection_dim}

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        if height % (f * self.transformer.config.patch_size) or width % (f * self.transformer.config.patch_size):
            raise ValueError(f"height and width must be multiples of {f * self.transformer.config.patch_size}")
        return (self.transformer.config.in_channels, height // f, width // f)

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        sched = self.pipe.scheduler
        if self.shift is not None:
            sched = type(sched).from_config(sched.config, shift=float(self.shift))
        else:
            sched = copy.deepcopy(sched)
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.float()

    def velocity(self, latents, sigma, cond, negative=None, guidance: float = 1.0,
                 uncond_grad: bool = False) -> torch.Tensor:
        use_cfg = negative is not None and guidance != 1.0
        x = latents.to(self.dtype)
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        sig = sig.expand(latents.shape[0]) if sig.ndim == 0 else sig
        emb, pooled = cond["prompt_embeds"], cond["pooled_projections"]
        if use_cfg:
            x = torch.cat([x, x])
            sig = torch.cat([sig, sig])
            emb = torch.cat([negative["prompt_embeds"], emb])
            pooled = torch.cat([negative["pooled_projections"], pooled])
        out = self.forward_module(hidden_states=x, encoder_hidden_states=emb.to(self.dtype),
                                  pooled_projections=pooled.to(self.dtype),
                                  timestep=(sig * 1000).to(self.dtype), return_dict=False)[0]
        if use_cfg:
            uncond, text = out.chunk(2)
            out = guided(uncond, text, guidance, uncond_grad)
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)

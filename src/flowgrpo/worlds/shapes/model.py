"""The shapes base model: a tiny Stable Diffusion 3 built from diffusers and transformers classes.

Everything here is a standard component, so the saved folder loads with
`StableDiffusion3Pipeline.from_pretrained(path)` and the demo runs the same code path as
SD3.5 users. What is tiny: a 32x32 RGB world, a VAE without downsampling (the verifier
needs crisp shapes; a 4x VAE trained briefly on a CPU loses them), two 3-layer CLIP text
encoders with a word-level tokenizer over the grammar's words, no T5 (its slot is zeros).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from .grammar import vocabulary

# How many zero "T5" tokens the shapes model was trained with. diffusers' default is 256;
# pass `max_sequence_length=SHAPES_T5_TOKENS` when calling the pipeline directly.
SHAPES_T5_TOKENS = 1


@dataclass
class ShapesArchitecture:
    """Sizes of the tiny SD3. Defaults are the shipped model's."""

    image_size: int = 32  # pixels; the VAE does not downsample, so latents are 32x32 too
    latent_channels: int = 4  # latent channels of the VAE (SD3 uses 16; flat colours need few)
    vae_channels: int = 32  # width of the one-level VAE
    patch_size: int = 4  # 8x8 = 64 image tokens
    num_layers: int = 6  # joint transformer blocks
    num_heads: int = 4  # attention heads of each block
    head_dim: int = 32  # width per head: the transformer is 128 wide
    text_hidden: int = 64  # width of each CLIP text encoder
    text_layers: int = 3  # layers of each CLIP text encoder
    text_projection: int = 32  # pooled projection width of each CLIP text encoder
    max_text_tokens: int = 16  # CLIP context length; prompts have at most 10 words


def write_word_tokenizer(folder: str | Path, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges rebuild every grammar word into one token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = vocabulary()
    tokens: list[str] = []
    merges: list[str] = []

    def add(tok: str) -> None:
        if tok not in tokens:
            tokens.append(tok)

    for ch in sorted({c for w in words for c in w}):
        add(ch)
        add(ch + "</w>")
    # Longest words first so that a shorter word's merges never split a longer one.
    for w in sorted(words, key=len, reverse=True):
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            line = f"{cur} {nxt}"
            if line not in merges:
                merges.append(line)
            cur = cur + nxt
            add(cur)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        add(special)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        model_max_length=max_length, pad_token="<|endoftext|>")
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word tokenizer splits {w!r} into {ids}")
    return tok


def build_text_encoder(arch: ShapesArchitecture, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_hidden, intermediate_size=arch.text_hidden * 4,
        num_hidden_layers=arch.text_layers, num_attention_heads=4, max_position_embeddings=arch.max_text_tokens,
        projection_dim=arch.text_projection, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(cfg)


def build_vae(arch: ShapesArchitecture) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(arch.vae_channels,),
        layers_per_block=1, latent_channels=arch.latent_channels, norm_num_groups=8,
        sample_size=arch.image_size, mid_block_add_attention=False,
        scaling_factor=1.0, shift_factor=0.0,
    )


def build_transformer(arch: ShapesArchitecture) -> SD3Transformer2DModel:
    inner = arch.num_heads * arch.head_dim
    return SD3Transformer2DModel(
        sample_size=arch.image_size, patch_size=arch.patch_size, in_channels=arch.latent_channels,
        out_channels=arch.latent_channels, num_layers=arch.num_layers, attention_head_dim=arch.head_dim,
        num_attention_heads=arch.num_heads, joint_attention_dim=2 * arch.text_hidden,
        caption_projection_dim=inner, pooled_projection_dim=2 * arch.text_projection,
        pos_embed_max_size=arch.image_size // arch.patch_size, qk_norm="rms_norm",
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # shift 1: at 32x32 there is little redundancy to push noise levels up for (SD3 uses 3).
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def build_pipeline(arch: ShapesArchitecture, tokenizer_dir: str | Path, seed: int = 0):
    """An untrained shapes pipeline (tests build tiny ones; pretraining fills the weights)."""
    from diffusers import StableDiffusion3Pipeline

    tok = write_word_tokenizer(tokenizer_dir, arch.max_text_tokens)
    torch.manual_seed(seed)
    return StableDiffusion3Pipeline(
        transformer=build_transformer(arch), scheduler=build_scheduler(), vae=build_vae(arch),
        text_encoder=build_text_encoder(arch, tok, seed + 1), tokenizer=tok,
        text_encoder_2=build_text_encoder(arch, tok, seed + 2), tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None,
    )


def save_pipeline(pipe, folder: str | Path, defaults: dict | None = None) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(folder)
    (folder / "flowgrpo_defaults.json").write_text(json.dumps(
        defaults or {"max_sequence_length": SHAPES_T5_TOKENS, "resolution": pipe.vae.config.sample_size,
                     "guidance": 4.5}))
    return folder

"""Tiny random SD3 (three text encoders, or two CLIPs without T5) and FLUX.1 pipelines of the
real diffusers classes, saved to a folder the way users' models are."""

import json
from pathlib import Path

import torch

SIZE = 16  # pixels; both tiny VAEs keep the resolution (one block), so latents are 16x16 too
MSL = 32  # T5 tokens
PROMPTS = ["a red circle", "two blue squares", 'a sign that says "hi"', "a green triangle above a cat"]


# ---- tiny pipelines ---------------------------------------------------------------------------
def clip_tokenizer():
    """Character-level CLIP BPE tokenizer from an in-memory vocabulary (no merges)."""
    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789\"'.,!?-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


def t5_tokenizer():
    """Unigram T5 tokenizer over single characters, from an in-memory vocabulary."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789\"'.,!?-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_encoder(tok, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=8,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def t5_encoder(tok, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))


def tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False,
                         scaling_factor=1.5, shift_factor=0.05)


def build_sd3(folder: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16,
                                        pos_embed_max_size=SIZE // 2)
    ct, tt = clip_tokenizer(), t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(1),
        text_encoder=clip_encoder(ct, True, 2), tokenizer=ct, text_encoder_2=clip_encoder(ct, True, 3),
        tokenizer_2=ct, text_encoder_3=t5_encoder(tt, 4), tokenizer_3=tt)
    pipe.save_pretrained(folder)
    (folder / "flowgrpo_defaults.json").write_text(json.dumps({"max_sequence_length": MSL, "resolution": SIZE,
                                                               "guidance": 3.0}))
    return folder


def build_flux(folder: Path) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=[2, 2, 4])
    ct, tt = clip_tokenizer(), t5_tokenizer()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    text_encoder = clip_encoder(ct, False, 2)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=tiny_vae(1), text_encoder=text_encoder,
                        tokenizer=ct, text_encoder_2=t5_encoder(tt, 4), tokenizer_2=tt)
    pipe.save_pretrained(folder)
    (folder / "flowgrpo_defaults.json").write_text(json.dumps({"max_sequence_length": MSL, "resolution": SIZE}))
    return folder


def build_sd3_without_t5(root: Path) -> Path:
    """A randomly initialised SD3 pipeline (16 px, no VAE downsampling, two 1-layer CLIPs over a
    word tokenizer, no T5) saved under root / "model"."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from flowgrpo.worlds.shapes.model import write_word_tokenizer

    torch.manual_seed(0)
    tok = write_word_tokenizer(root / "tokenizer", max_length=16)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, projection_dim=8, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, mid_block_add_attention=False,
                        scaling_factor=1.0, shift_factor=0.0)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=4, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                    vae=vae, text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(),
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    folder = root / "model"
    pipe.save_pretrained(folder)
    (folder / "flowgrpo_defaults.json").write_text(json.dumps({"max_sequence_length": 1}))
    return folder

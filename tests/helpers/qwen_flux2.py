"""Tiny random Qwen-Image (Qwen2.5-VL text encoder) and FLUX.2 (Mistral-3 text encoder)
pipelines of the real diffusers classes, and what their tests share: sampling through the
policy and through the pipeline, and the GPU recipes shrunk to them."""

import json
import re
from pathlib import Path

import numpy as np
import torch

from flowgrpo.config import load_config
from flowgrpo.sampling import rollout
from flowgrpo.train_config import TrainConfig, validate

from . import ROOT

MSL = 24  # text tokens kept after the template (Qwen) / in the chat-templated sequence (FLUX.2: 64)
MSL_FLUX2 = 64
PROMPTS = ["a red circle", "two blue squares", 'a sign that says "hi"', "a green triangle above a cat"]
PAIR = [PROMPTS[0], PROMPTS[2]]  # different lengths: padding and masks inside the batch
SIZES = [(16, 16), (24, 16)]  # (height, width): square, and non-square to check the token layout
GUIDANCE = {"qwen_image": 3.0, "flux2": 4.0}  # Qwen: true_cfg_scale; FLUX.2: the embedded guidance value
QWEN_TEMPLATE_WORDS = ("system user assistant Describe the image by detailing the color, shape, size, texture, "
                       "quantity, text, spatial relationships of the objects and background:")


# ---- tiny pipelines ---------------------------------------------------------------------------
def word_tokenizer(text: str, special: list[str], pad: str, unk: str = "<unk>", chat_template: str | None = None):
    """A word-level fast tokenizer (words, punctuation and newlines are tokens) over `text`'s words."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]", text + " " + " ".join(PROMPTS))))
    vocab = {w: i for i, w in enumerate(dict.fromkeys([pad, unk, *special, "\n", *words]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), "removed", invert=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, unk_token=unk, additional_special_tokens=special)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def build_qwen_image(folder: Path) -> Path:
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # the template's system part is 34 word-level tokens here too, as with the real tokenizer
    tok = word_tokenizer(QWEN_TEMPLATE_WORDS, ["<|im_start|>", "<|im_end|>"], pad="<|endoftext|>")
    ids = dict(bos_token_id=0, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=0)
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1e6, "vocab_size": len(tok), **ids,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok), **ids)
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    torch.manual_seed(1)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(2, 2, 4))
    torch.manual_seed(2)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0])
    # Qwen-Image's published scheduler config (dynamic exponential shift, terminal 0.02)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                            time_shift_type="exponential")
    QwenImagePipeline(transformer=transformer, vae=vae, scheduler=sched, text_encoder=text_encoder,
                      tokenizer=tok).save_pretrained(folder)
    (folder / "flowgrpo_defaults.json").write_text(json.dumps({"max_sequence_length": MSL, "resolution": 16}))
    return folder


# Mistral-style chat template over FLUX.2's message format (content: a list of {"type": "text", "text"})
MISTRAL_TEMPLATE = ("<s>{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% else %}[INST]{% endif %}"
                    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
                    "{% if m['role'] == 'system' %}[/SYSTEM_PROMPT]{% else %}[/INST]{% endif %}{% endfor %}")


def build_flux2(folder: Path) -> Path:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = word_tokenizer(SYSTEM_MESSAGE, ["<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"],
                         pad="<pad>", chat_template=MISTRAL_TEMPLATE)
    ids = dict(bos_token_id=tok.convert_tokens_to_ids("<s>"), eos_token_id=tok.convert_tokens_to_ids("</s>"),
               pad_token_id=0)
    torch.manual_seed(0)
    # 30 layers: the pipeline stacks hidden states 10, 20 and 30 (joint_attention_dim = 3 x 16)
    cfg = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 16,
                     "max_position_embeddings": 256, "num_attention_heads": 2, "num_hidden_layers": 30,
                     "num_key_value_heads": 1, "head_dim": 8, "rope_theta": 1e6, "sliding_window": None, **ids},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 16, "image_size": 12, "patch_size": 6, "num_channels": 3},
        image_token_index=len(tok) - 1, **ids)
    text_encoder = Mistral3ForConditionalGeneration(cfg).eval()
    torch.manual_seed(1)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=[2, 2, 2, 2])
    torch.manual_seed(2)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                             latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                             sample_size=16)
    vae.bn.running_mean.copy_(torch.randn(16) * 0.3)  # non-trivial statistics: decode must use them
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    # FLUX.2 [dev]'s scheduler: dynamic (exponential) shift with the pipeline's empirical mu
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    Flux2Pipeline(transformer=transformer, vae=vae, scheduler=sched, text_encoder=text_encoder,
                  tokenizer=tok).save_pretrained(folder)
    (folder / "flowgrpo_defaults.json").write_text(json.dumps({"max_sequence_length": MSL_FLUX2, "resolution": 16}))
    return folder


def build_models(root: Path) -> dict[str, Path]:
    return {"qwen_image": build_qwen_image(root / "qwen_image"), "flux2": build_flux2(root / "flux2")}


def pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, {"qwen_image": "QwenImagePipeline", "flux2": "Flux2Pipeline"}[name])


def msl(name: str) -> int:
    return MSL_FLUX2 if name == "flux2" else MSL


def ode_images(policy, prompts, guidance, size=SIZES[0], seeds=(0, 1), steps=4) -> torch.Tensor:
    h, w = size
    cond = policy.encode_prompts(prompts)
    init = torch.stack([torch.randn(policy.latent_shape(h, w), generator=torch.Generator().manual_seed(s))
                        for s in seeds])
    return rollout(policy, cond, policy.encode_prompts([""]), num_steps=steps, guidance=guidance, noise_level=0.0,
                   kind="ode", height=h, width=w, generator=torch.Generator().manual_seed(0),
                   init_latents=init).images


def pipeline_images(pipe, name, prompts, guidance, size, seeds=(0, 1), steps=4) -> np.ndarray:
    h, w = size
    kw = dict(num_inference_steps=steps, height=h, width=w, output_type="np", max_sequence_length=msl(name),
              generator=[torch.Generator().manual_seed(s) for s in seeds])
    if name == "qwen_image":  # true CFG only with a negative prompt and a scale above 1
        kw.update(true_cfg_scale=guidance, negative_prompt="" if guidance > 1 else None)
    else:
        kw.update(guidance_scale=guidance)
    return pipe(prompt=prompts, **kw).images  # (Flux2Pipeline: the first positional argument is the image)



# ---- training ----------------------------------------------------------------------------------
RECIPES = {
    "qwen_image": ("qwen_image_geneval.yaml", ["reward.weights={jpeg_compressibility: 1.0}", "reward.args={}"]),
    "flux2": ("flux2_prefgrpo.yaml", [
        "reward.weights={pref_winrate: 0.7, jpeg_incompressibility: 1.4}",
        "reward.args={pref_winrate: {judge: bradley_terry, judge_args: {reward: jpeg_compressibility}}}"]),
}


def write_prompts(folder: Path, prompts=PROMPTS) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def tiny_overrides(name: str, model: Path, out: Path, prompts: Path, extra=()) -> list[str]:
    """Overrides that shrink a GPU recipe to the tiny model: sizes and steps only."""
    rewards = RECIPES[name][1]
    return [f"model.path={model}", "model.dtype=float32", f"model.max_sequence_length={msl(name)}",
            "model.embedding_cache=null", "model.lora.rank=4", "model.lora.alpha=8", "sample.resolution=16",
            "sample.num_steps=4", "sample.group_size=4", "sample.prompts_per_step=2", "sample.batch_size=8",
            "optim.train_batch_size=8", "optim.optimizer_steps=1", "optim.steps=2", "optim.lr=0.01",
            "optim.ema_decay=0", f"data.train={prompts}", "data.test=", f"run.output_dir={out}",
            "run.tensorboard=false", "run.save_every=0", "run.grid_every=0", *rewards, *extra]


def tiny_recipe(name: str, model: Path, out: Path, prompts: Path, extra=()) -> TrainConfig:
    """A GPU recipe shrunk to the tiny model: sizes and steps only; the algorithm stays the recipe's."""
    over = tiny_overrides(name, model, out, prompts, extra)
    return validate(load_config(TrainConfig, ROOT / "configs" / "recipes" / RECIPES[name][0], over))

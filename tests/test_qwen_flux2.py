"""Qwen-Image (Qwen2.5-VL text encoder, true CFG with norm rescaling, masked text) and FLUX.2
(Mistral-3 text encoder, 4-axis position ids, embedded guidance) policies on tiny random
pipelines of the real diffusers classes, built here, saved and loaded back the way users load
real ones. Mirrors tests/test_real_models.py for SD3 / FLUX.1."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.config import load_config
from flowgrpo.models import _backend_for, load_policy
from flowgrpo.runlog import read_metrics
from flowgrpo.sampling import rollout
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("new_backends")
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


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen_image", "flux2"])
def test_policy_sampling_equals_the_diffusers_pipeline(models, name):
    """Same noise, same steps, two resolutions, guidance on and off: the policy's ODE rollout
    reproduces the pipeline's images (text template and masks, packing, img_shapes / ids,
    resolution-dependent sigmas, true CFG with its norm rescaling / embedded guidance, VAE
    de-normalisation)."""
    from flowgrpo.models.flux2 import Flux2Policy
    from flowgrpo.models.qwen_image import QwenImagePolicy

    policy = load_policy(str(models[name]))
    assert isinstance(policy, {"qwen_image": QwenImagePolicy, "flux2": Flux2Policy}[name])
    pipe = pipeline_class(name).from_pretrained(str(models[name]))
    pipe.set_progress_bar_config(disable=True)
    diffs = {}
    for size in SIZES:
        for g in (1.0, GUIDANCE[name]):
            ours = ode_images(policy, PAIR, g, size).permute(0, 2, 3, 1).numpy()
            ref = pipeline_images(pipe, name, PAIR, g, size)
            assert ours.shape == ref.shape == (2, *size, 3)
            assert ref.std() > 0.01
            diffs[(size, g)] = float(np.abs(ours - ref).max())
    print(name, diffs)
    assert max(diffs.values()) < 1e-5, diffs


def test_text_template_position_ids_and_sigmas(models):
    """Qwen-Image: the template's 34 system tokens are dropped, the mask marks each prompt's own
    length, padding to max_sequence_length does not change the velocity. FLUX.2: the guidance
    value acts through its embedding. Both: mu (so the sigmas) depends on the resolution."""
    qwen = load_policy(str(models["qwen_image"]))
    cond = qwen.encode_prompts(PAIR)
    assert cond["prompt_embeds"].shape == (2, MSL, 16) and cond["prompt_embeds_mask"].shape == (2, MSL)
    # kept: the prompt's words, then <|im_end|> \n <|im_start|> assistant \n (5 tokens)
    assert cond["prompt_embeds_mask"].sum(1).tolist() == [3 + 5, 7 + 5]
    lat = torch.randn(2, *qwen.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    alone = torch.cat([qwen.velocity(lat[i:i + 1], 0.7, qwen.encode_prompts([p])) for i, p in enumerate(PAIR)])
    assert (qwen.velocity(lat, 0.7, cond) - alone).abs().max() < 1e-6
    flux2 = load_policy(str(models["flux2"]))
    c2 = flux2.encode_prompts(PAIR)
    assert c2["prompt_embeds"].shape == (2, MSL_FLUX2, 48) and not torch.equal(*c2["prompt_embeds"].unbind(0))
    lat2 = torch.randn(2, *flux2.latent_shape(16, 16))
    assert not torch.allclose(flux2.velocity(lat2, 0.5, c2, None, 1.0), flux2.velocity(lat2, 0.5, c2, None, 4.0))
    for pol in (qwen, flux2):
        assert not torch.allclose(pol.sigmas(4, 16, 16), pol.sigmas(4, 64, 64))
        with pytest.raises(ValueError, match="multiples of"):
            pol.latent_shape(17, 16)


# ---- training -----------------------------------------------------------------------------------
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


def preprocess(model: Path, prompts: Path, out: Path) -> Path:
    from flowgrpo.cli import main

    assert main(["preprocess", "--model", str(model), "--prompts", str(prompts), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> dict[str, Path]:
    """Two GRPO iterations of each tiny model through `train`, both reading their prompts from an
    embedding cache (no text encoder loaded): Qwen-Image with true CFG and KL (GenEval recipe),
    FLUX.2 with embedded guidance, shift 3, shared group noise, RatioNorm and per-sample subsets
    (Pref-GRPO recipe)."""
    root = tmp_path_factory.mktemp("trained_new")
    prompts = write_prompts(root)
    runs = {}
    # FLUX.2: the last step stays a candidate on the 4-step model: 60% of 4 -> 2 trained steps, not 60% of 3 -> 1
    extra = {"qwen_image": [], "flux2": ["optim.timestep_exclude_last=false"]}
    for name in ("qwen_image", "flux2"):
        cache = preprocess(models[name], prompts, root / f"{name}_cache")
        train(tiny_recipe(name, models[name], root / name, prompts, [f"model.embedding_cache={cache}", *extra[name]]))
        runs[name] = root / name
    return runs


@pytest.mark.parametrize("name", ["qwen_image", "flux2"])
def test_two_grpo_iterations_with_lora(trained, name):
    rows = [m for m in read_metrics(trained[name] / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2
    print(name, "max_ratio_dev_first", [m["train/max_ratio_dev_first"] for m in rows])
    for m in rows:
        assert np.isfinite(m["train/policy_loss"])
        assert m["train/max_ratio_dev_first"] == 0.0  # recomputed log-probs equal the rollout's
    lora = load_file(trained[name] / "lora" / "pytorch_lora_weights.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at 0
    if name == "qwen_image":  # MLPs are targets; true CFG recipe with KL: the reference at step 0 only
        assert any(".img_mlp.net.2.lora_B" in k for k in lora) and any(".txt_mlp.net.0.proj.lora_B" in k for k in lora)
        assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] > 0.0
    else:  # both single-stream projections are targets; a random 60% of 4 steps per image -> 2
        assert any("single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_B" in k for k in lora)
        assert any("single_transformer_blocks.1.attn.to_out.lora_B" in k for k in lora)
        assert rows[0]["train/timesteps"] == 2


@pytest.mark.parametrize("name", ["qwen_image", "flux2"])
def test_saved_lora_reproduces_the_trained_policy(models, trained, name):
    """A plain `pipe.load_lora_weights` (no scale) gives the velocities and images of the policy
    as the trainer held it (rebuilt from the final checkpoint's raw trained tensors), and the
    pipeline's own __call__ with that LoRA equals the policy's ODE sampling."""
    from test_lora_strength import trained_policy

    lora = tiny_recipe(name, models[name], trained[name], write_prompts(trained[name].parent)).model.lora
    policy = trained_policy(models[name], trained[name], lora.rank, lora.alpha, lora.targets, lora.init)
    plain = load_policy(str(models[name]))
    plain.pipe.load_lora_weights(str(trained[name] / "lora"))  # diffusers' own call, no scale
    cond, neg = plain.encode_prompts(PAIR), plain.encode_prompts(["", ""])
    base = load_policy(str(models[name]))
    lat = torch.randn(2, *plain.latent_shape(16, 16), generator=torch.Generator().manual_seed(3))
    g = GUIDANCE[name]
    with torch.no_grad():
        v = [torch.stack([pol.velocity(lat, s, cond, neg, g) for s in (0.9, 0.4)]) for pol in (plain, policy, base)]

    assert (v[0] - v[2]).abs().max() > 1e-4  # the LoRA moved the model
    vdiff = float((v[0] - v[1]).abs().max())
    idiff = float((ode_images(plain, PAIR, g) - ode_images(policy, PAIR, g)).abs().max())
    pipe = pipeline_class(name).from_pretrained(str(models[name]))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(trained[name] / "lora"))
    pdiff = float(np.abs(pipeline_images(pipe, name, PAIR, g, SIZES[0])
                         - ode_images(policy, PAIR, g).permute(0, 2, 3, 1).numpy()).max())
    print(name, "lora velocity diff", vdiff, "image diff", idiff, "pipeline+lora vs policy", pdiff)
    assert vdiff < 1e-6 and idiff < 1e-6 and pdiff < 1e-5


@pytest.mark.parametrize("name", ["qwen_image", "flux2"])
def test_embedding_cache_equals_direct_encoding(models, tmp_path, name):
    from flowgrpo.models.cache import CachedEncoder, EmbeddingCacheError

    cache = preprocess(models[name], write_prompts(tmp_path, PROMPTS[:3]), tmp_path / "cache")
    direct = load_policy(str(models[name]))
    want, got = direct.encode_prompts(PROMPTS[:3] + [""]), CachedEncoder(cache)(PROMPTS[:3] + [""])
    assert want.keys() == got.keys() == ({"prompt_embeds", "prompt_embeds_mask"} if name == "qwen_image"
                                         else {"prompt_embeds"})
    for k in want:
        assert torch.allclose(want[k].to(got[k].dtype), got[k], atol=1e-6), k
    cached = load_policy(str(models[name]), embedding_cache=str(cache))
    assert cached.pipe.text_encoder is None and cached.pipe.tokenizer is None
    with pytest.raises(EmbeddingCacheError, match="max_sequence_length"):
        load_policy(str(models[name]), embedding_cache=str(cache), max_sequence_length=msl(name) + 1)
    other = "flux2" if name == "qwen_image" else "qwen_image"
    with pytest.raises(EmbeddingCacheError, match="made for"):
        load_policy(str(models[other]), embedding_cache=str(cache))


def test_recipes_load_and_hub_ids_pick_the_backends():
    from omegaconf import OmegaConf

    from flowgrpo.rewards.base import available_rewards

    want = {"qwen_image": "QwenImagePipeline", "flux2": "Flux2Pipeline"}
    for path in sorted((ROOT / "configs" / "recipes").glob("*.yaml")):
        prefix = next((p for p in want if path.name.startswith(p + "_")), None)
        if prefix is None:
            continue
        cfg = validate(load_config(TrainConfig, path))
        head = path.read_text().split("\nmodel:")[0]
        assert "flowgrpo train configs/recipes/" + path.name in head and "GPU" in head, path.name
        assert "flowgrpo preprocess" in head and cfg.model.embedding_cache and cfg.model.gradient_checkpointing
        assert cfg.reward.weights == dict(OmegaConf.load(path).reward.weights), path.name
        assert set(cfg.reward.weights) <= set(available_rewards()), path.name
        assert _backend_for(cfg.model.path, cfg.model.backend) == want[prefix], path.name
        assert cfg.sample.batch_size == cfg.optim.train_batch_size
    assert _backend_for("black-forest-labs/FLUX.1-dev", "auto") == "FluxPipeline"
    assert _backend_for("x", "qwen_image") == "QwenImagePipeline" and _backend_for("x", "flux2") == "Flux2Pipeline"

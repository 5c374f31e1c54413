"""Qwen-Image (Qwen2.5-VL text encoder, true CFG with norm rescaling, masked text) and FLUX.2
(Mistral-3 text encoder, 4-axis position ids, embedded guidance) policies on tiny random
pipelines of the real diffusers classes (tests/helpers/qwen_flux2.py), saved and loaded back the way users load
real ones. Mirrors tests/test_real_models.py for SD3 / FLUX.1."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from helpers.qwen_flux2 import (GUIDANCE, MSL, MSL_FLUX2, PAIR, PROMPTS, SIZES, build_models, msl, ode_images,
                                  pipeline_class, pipeline_images, tiny_recipe, write_prompts)
from safetensors.torch import load_file

from flowgrpo.config import load_config
from flowgrpo.models import _backend_for, load_policy
from flowgrpo.runlog import read_metrics
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("new_backends"))


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
    from helpers import trained_policy

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

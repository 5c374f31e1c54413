"""SD3 (three text encoders, true CFG) and FLUX.1 (packed latents, guidance embedding) policies
on tiny random pipelines (tests/helpers/pipelines.py), saved, and loaded back the way users load real ones."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from helpers.pipelines import MSL, PROMPTS, SIZE, build_flux, build_sd3
from safetensors.torch import load_file

from flowgrpo.config import load_config, save_config
from flowgrpo.models import load_policy
from flowgrpo.runlog import read_metrics
from flowgrpo.sampling import rollout
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    return {"sd3": build_sd3(root / "sd3"), "flux": build_flux(root / "flux")}


GUIDANCE = {"sd3": 3.0, "flux": 3.5}  # SD3: true CFG scale; FLUX: the embedded guidance value


def write_prompts(folder: Path, prompts=PROMPTS) -> Path:
    path = folder / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    return path


def recipe_overrides(name: str, model: Path, out: Path, prompts: Path, extra=()) -> list[str]:
    """Shrink a GPU recipe to the tiny model: sizes and steps only; the algorithm stays the recipe's."""
    return [f"model.path={model}", "model.dtype=float32", f"model.max_sequence_length={MSL}",
            "model.embedding_cache=null", "model.lora.rank=4", "model.lora.alpha=8", f"sample.resolution={SIZE}",
            "sample.num_steps=4", "sample.group_size=4", "sample.prompts_per_step=2", "sample.batch_size=8",
            "optim.train_batch_size=8", "optim.optimizer_steps=1", "optim.steps=2", "optim.lr=0.01",
            "optim.ema_decay=0", f"data.train={prompts}", "data.test=", f"run.output_dir={out}",
            "run.tensorboard=false", "run.save_every=0", "run.grid_every=0", *extra]


# The recipes the tiny runs follow, with rewards that need no model or server in a test (and what a
# 4-step model needs).
RECIPES = {
    "sd3": ("sd35m_pickscore.yaml", ["reward.weights={jpeg_compressibility: 1.0}", "reward.args={}"]),
    "flux": ("flux_dev_prefgrpo.yaml", [
        "reward.weights={pref_winrate: 0.7, jpeg_incompressibility: 1.4}",
        "reward.args={pref_winrate: {judge: bradley_terry, judge_args: {reward: jpeg_compressibility}}}",
        # the last step stays a candidate on the 4-step model: 60% of 4 -> 2 trained steps, not 60% of 3 -> 1
        "optim.timestep_exclude_last=false"]),
}


def tiny_recipe(name: str, model: Path, out: Path, prompts: Path, extra=()) -> TrainConfig:
    recipe, rewards = RECIPES[name]
    return validate(load_config(TrainConfig, ROOT / "configs" / "recipes" / recipe,
                                recipe_overrides(name, model, out, prompts, [*rewards, *extra])))


def preprocess(model: Path, prompts: Path, out: Path) -> Path:
    from flowgrpo.cli import main

    assert main(["preprocess", "--model", str(model), "--prompts", str(prompts), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> dict[str, Path]:
    """Two GRPO iterations of each tiny model through `train`: SD3 encodes prompts with its
    three encoders (true CFG), FLUX reads them from an embedding cache (no encoders loaded)."""
    root = tmp_path_factory.mktemp("trained")
    prompts = write_prompts(root)
    runs = {}
    train(tiny_recipe("sd3", models["sd3"], root / "sd3", prompts))
    runs["sd3"] = root / "sd3"
    cache = preprocess(models["flux"], prompts, root / "flux_cache")
    train(tiny_recipe("flux", models["flux"], root / "flux", prompts, [f"model.embedding_cache={cache}"]))
    runs["flux"] = root / "flux"
    runs["flux_cache"] = cache
    return runs


def ode_images(policy, prompts, guidance, seeds=(0, 1), steps=4) -> torch.Tensor:
    cond = policy.encode_prompts(prompts)
    init = torch.stack([torch.randn(policy.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(s))
                        for s in seeds])
    return rollout(policy, cond, policy.encode_prompts([""]), num_steps=steps, guidance=guidance, noise_level=0.0,
                   kind="ode", height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0),
                   init_latents=init).images


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_policy_sampling_equals_the_diffusers_pipeline(models, name):
    """Same noise, same steps: the policy's ODE rollout reproduces the pipeline's images, so
    latent layout, text ids, sigmas (FLUX: resolution-dependent mu) and guidance all match."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from flowgrpo.models.flux import FluxPolicy
    from flowgrpo.models.sd3 import SD3Policy

    policy = load_policy(str(models[name]))
    assert isinstance(policy, {"sd3": SD3Policy, "flux": FluxPolicy}[name])
    ours = ode_images(policy, PROMPTS[:2], GUIDANCE[name]).permute(0, 2, 3, 1).numpy()
    pipe = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[name].from_pretrained(str(models[name]))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=GUIDANCE[name], max_sequence_length=MSL,
               height=SIZE, width=SIZE, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert ref.std() > 0.01
    assert np.abs(ours - ref).max() < 1e-5


def test_flux_sigmas_and_layout(models):
    from flowgrpo.models.flux import pack_latents, unpack_latents

    policy = load_policy(str(models["flux"]))
    n = 4
    s = np.linspace(1.0, 1 / n, n)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * ((SIZE // 2) * (SIZE // 2) - 256)  # 64 packed tokens
    want = np.exp(mu) / (np.exp(mu) + 1 / s - 1)
    assert np.allclose(policy.sigmas(n, SIZE, SIZE).numpy(), [*want, 0.0], atol=1e-6)
    policy.shift = 3.0  # Pref-GRPO's static shift replaces mu
    assert np.allclose(policy.sigmas(n, SIZE, SIZE).numpy(), [*(3 * s / (1 + 2 * s)), 0.0], atol=1e-6)
    x = torch.randn(2, 4, 6, 8)
    assert pack_latents(x).shape == (2, 12, 16) and torch.equal(unpack_latents(pack_latents(x), 6, 8), x)
    # the guidance value changes FLUX.1-dev's velocity through its embedding, with no second pass
    cond = policy.encode_prompts(PROMPTS[:1])
    lat = torch.randn(1, *policy.latent_shape(SIZE, SIZE))
    assert not torch.allclose(policy.velocity(lat, 0.5, cond, None, 1.0), policy.velocity(lat, 0.5, cond, None, 3.5))
    with pytest.raises(ValueError, match="multiples of 2"):
        policy.latent_shape(SIZE + 1, SIZE)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_two_grpo_iterations_with_lora(trained, name):
    out = trained[name]
    rows = [m for m in read_metrics(out / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2
    for m in rows:
        assert np.isfinite(m["train/policy_loss"])
        assert m["train/max_ratio_dev_first"] == 0.0  # recomputed log-probs equal the rollout's
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at 0
    if name == "flux":  # feed-forward layers are LoRA targets too; timesteps: a random 60% of 4 -> 2
        assert any(".ff.net.2.lora_B" in k for k in lora) and any("single_transformer_blocks" in k for k in lora)
        assert rows[0]["train/timesteps"] == 2
    else:  # true CFG recipe with KL: the policy is the reference at step 0, not after
        assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] > 0.0


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_saved_lora_loads_in_diffusers_and_changes_output(models, trained, name):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[name].from_pretrained(str(models[name]))
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=GUIDANCE[name], max_sequence_length=MSL,
                    height=SIZE, width=SIZE, output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = run()
    pipe.load_lora_weights(str(trained[name] / "lora"))
    assert np.abs(run() - before).max() > 1e-3


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_saved_lora_reproduces_the_trained_policy(models, trained, name):
    """alpha 8 / rank 4: a plain `load_lora_weights`, with no scale, gives the velocities and
    images of the policy as the trainer held it (rebuilt from the final checkpoint's raw
    trained tensors), within 1e-6 in fp32."""
    from helpers import trained_policy

    cfg = tiny_recipe(name, models[name], trained[name], write_prompts(trained[name].parent), [])
    lora = cfg.model.lora
    assert lora.alpha != lora.rank
    policy = trained_policy(models[name], trained[name], lora.rank, lora.alpha, lora.targets, lora.init)
    plain = load_policy(str(models[name]))
    plain.pipe.load_lora_weights(str(trained[name] / "lora"))  # diffusers' own call, no scale

    def velocity(pol):
        cond = pol.encode_prompts(PROMPTS[:2])
        lat = torch.randn(2, *pol.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(3))
        return torch.stack([pol.velocity(lat, s, cond, None, GUIDANCE[name] if name == "flux" else 1.0)
                            for s in (0.9, 0.4)])

    assert (velocity(plain) - velocity(policy)).abs().max() < 1e-6
    assert (ode_images(plain, PROMPTS[:2], GUIDANCE[name]) - ode_images(policy, PROMPTS[:2], GUIDANCE[name])
            ).abs().max() < 1e-6


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_embedding_cache_equals_direct_encoding(models, tmp_path, name):
    from flowgrpo.models.cache import CachedEncoder, EmbeddingCacheError

    prompts = write_prompts(tmp_path, PROMPTS[:3])
    cache = preprocess(models[name], prompts, tmp_path / "cache")
    direct = load_policy(str(models[name]))
    enc = CachedEncoder(cache)
    assert len(enc) == 4 and "" in enc  # the negative prompt is always cached
    want, got = direct.encode_prompts(PROMPTS[:3] + [""]), enc(PROMPTS[:3] + [""])
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k
    # a policy on the cache loads no text encoder and returns the same condition
    cached = load_policy(str(models[name]), embedding_cache=str(cache))
    assert cached.pipe.text_encoder is None and cached.pipe.text_encoder_2 is None
    assert torch.allclose(cached.encode_prompts(PROMPTS[:1])["prompt_embeds"], want["prompt_embeds"][:1], atol=1e-6)
    # re-running adds only new prompts; wrong prompts, lengths and models are refused
    write_prompts(tmp_path, PROMPTS)
    from flowgrpo.models.cache import build_cache

    assert build_cache(str(models[name]), PROMPTS, cache)["added"] == 1
    with pytest.raises(EmbeddingCacheError, match="not in embedding cache"):
        cached.encode_prompts(["a prompt never cached"])
    with pytest.raises(EmbeddingCacheError, match="max_sequence_length"):
        load_policy(str(models[name]), embedding_cache=str(cache), max_sequence_length=MSL + 1)
    other = "flux" if name == "sd3" else "sd3"
    with pytest.raises(EmbeddingCacheError, match="made for"):
        load_policy(str(models[other]), embedding_cache=str(cache))


def test_trainer_reads_the_embedding_cache(models, trained, tmp_path):
    """With model.embedding_cache set, the trainer's prompts come from the cache: a prompt the
    cache lacks stops the run with the fix in the message."""
    from flowgrpo.models.cache import EmbeddingCacheError

    prompts = write_prompts(tmp_path, ["a prompt outside the cache"])
    cfg = tiny_recipe("flux", models["flux"], tmp_path / "run", prompts,
                      [f"model.embedding_cache={trained['flux_cache']}"])
    with pytest.raises(EmbeddingCacheError, match="flowgrpo preprocess"):
        train(cfg)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_export_merged_lora_reproduces_the_lora_model(models, trained, tmp_path, name):
    from flowgrpo.cli import main

    out = tmp_path / "exported"
    assert main(["export", "--model", str(models[name]), "--lora", str(trained[name] / "lora"), "--out", str(out),
                 "--merge-lora", "--dtype", "float32"]) == 0
    assert (out / "model_index.json").is_file() and not list(out.rglob("*lora*"))
    with_lora = load_policy(str(models[name]))
    base = ode_images(with_lora, PROMPTS[:2], GUIDANCE[name])
    with_lora.load_lora(trained[name] / "lora")
    want = ode_images(with_lora, PROMPTS[:2], GUIDANCE[name])
    got = ode_images(load_policy(str(out)), PROMPTS[:2], GUIDANCE[name])
    assert (want - base).abs().max() > 1e-3
    assert (got - want).abs().max() < 1e-4
    if name == "sd3":  # without --merge-lora: the base pipeline with the LoRA beside it, unfused
        out2 = tmp_path / "unfused"
        assert main(["export", "--model", str(models[name]), "--lora", str(trained[name] / "lora"), "--out",
                     str(out2), "--dtype", "float32"]) == 0
        unfused = load_policy(str(out2))
        assert (ode_images(unfused, PROMPTS[:2], GUIDANCE[name]) - base).abs().max() < 1e-6
        unfused.load_lora(out2 / "lora")
        assert (ode_images(unfused, PROMPTS[:2], GUIDANCE[name]) - want).abs().max() < 1e-6


def test_full_finetune_flux_and_export_the_transformer(models, tmp_path):
    """model.lora.enabled=false trains every transformer weight; export swaps the result in."""
    from flowgrpo.cli import main

    prompts = write_prompts(tmp_path)
    cfg = tiny_recipe("flux", models["flux"], tmp_path / "run", prompts,
                      ["model.lora.enabled=false", "optim.steps=1", "optim.lr=1e-3"])
    train(cfg)
    rows = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 1 and rows[0]["train/max_ratio_dev_first"] == 0.0
    assert (tmp_path / "run" / "model" / "transformer" / "config.json").is_file()
    out = tmp_path / "exported"
    assert main(["export", "--model", str(models["flux"]), "--transformer", str(tmp_path / "run" / "model"),
                 "--out", str(out), "--dtype", "float32"]) == 0
    base = load_policy(str(models["flux"]))
    tuned = load_policy(str(out))
    trained_w = load_file(next((tmp_path / "run" / "model" / "transformer").glob("*.safetensors")))
    tuned_w = tuned.transformer.state_dict()
    assert all(torch.equal(tuned_w[k], v) for k, v in trained_w.items())
    assert (ode_images(tuned, PROMPTS[:2], 3.5) - ode_images(base, PROMPTS[:2], 3.5)).abs().max() > 1e-4


def test_recipes_and_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from omegaconf import OmegaConf

    from flowgrpo.models import _backend_for
    from flowgrpo.rewards.base import available_rewards

    recipes = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        cfg = validate(load_config(TrainConfig, path))
        head = path.read_text().split("\nmodel:")[0]
        assert "flowgrpo train configs/recipes/" + path.name in head and "GPU" in head, path.name
        # the file's rewards replace the default ones instead of joining them
        assert cfg.reward.weights == dict(OmegaConf.load(path).reward.weights), path.name
        assert set(cfg.reward.weights) <= set(available_rewards()), path.name
        assert _backend_for(cfg.model.path, cfg.model.backend) in ("StableDiffusion3Pipeline", "FluxPipeline",
                                                                     "QwenImagePipeline", "Flux2Pipeline")
    flux = validate(load_config(TrainConfig, ROOT / "configs" / "recipes" / "flux_dev_prefgrpo.yaml"))
    s = flux.sample
    assert (s.num_steps, s.noise_level, flux.model.shift, s.group_size, s.guidance) == (25, 0.7, 3.0, 8, 3.5)
    assert flux.sample.same_noise_per_group and flux.optim.timestep_mode == "random" and flux.reward.mix == "advantage"
    # accelerate reads every launch config (sharding is the trainer's parallel.strategy, not accelerate's)
    for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml")):
        acc = load_config_from_file(str(path))
        assert acc.distributed_type in ("MULTI_GPU", DistributedType.MULTI_GPU) and not acc.fsdp_config, path.name


def test_two_processes_run_the_tiny_sd3_fast_recipe(models, tmp_path):
    """The CFG-free Fast recipe on the tiny SD3, two CPU processes (DDP over gloo)."""
    prompts = write_prompts(tmp_path)
    cfg = validate(load_config(TrainConfig, ROOT / "configs" / "recipes" / "sd35m_fast_nocfg.yaml", recipe_overrides(
        "sd3", models["sd3"], tmp_path / "run", prompts,
        ["reward.weights={jpeg_compressibility: 1.0}", "reward.args={}", "run.dump_advantages=true",
         # the official window of 3 from a start in [0, 2] needs 5 steps; the 4-step model takes a window of 2
         "sample.window_size=2", "sample.window_start_range=[0, 2]"])))
    save_config(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "127.0.0.1:0", "-m", "flowgrpo", "train", str(tmp_path / "cfg.yaml")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("advantages-rank*.jsonl")) == ["advantages-rank0.jsonl",
                                                                            "advantages-rank1.jsonl"]
    rows = [m for m in read_metrics(run / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2 and all(np.isfinite(m["train/policy_loss"]) for m in rows)
    assert all(m["train/max_ratio_dev_first"] == 0.0 and m["train/timesteps"] == 2 for m in rows)
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())


def test_sample_command_is_the_flux_quick_start(models, tmp_path):
    """`flowgrpo sample --seed 0` draws image 0 from the noise FluxPipeline draws with
    generator seed 0, with the model's guidance (3.5 for FLUX.1-dev): the same picture as the
    model card's quick start at equal size and steps."""
    from diffusers import FluxPipeline
    from PIL import Image

    from flowgrpo.cli import main

    out = tmp_path / "samples"
    assert main(["sample", "--model", str(models["flux"]), "--prompt", PROMPTS[0], "--n", "1", "--seed", "0",
                 "--steps", "3", "--out", str(out)]) == 0
    ours = np.asarray(Image.open(out / "0000_0.png")).astype(int)
    pipe = FluxPipeline.from_pretrained(str(models["flux"]))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[0], height=SIZE, width=SIZE, guidance_scale=3.5, num_inference_steps=3,
               max_sequence_length=MSL, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(ours - np.asarray(ref).astype(int)).max() <= 1
    # CPU offload needs an accelerator: a one-line error, not a traceback
    assert main(["sample", "--model", str(models["flux"]), "--prompt", "x", "--device", "cpu", "--cpu-offload",
                 "--out", str(tmp_path / "x")]) == 2

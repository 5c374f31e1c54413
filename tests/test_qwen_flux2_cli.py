"""Qwen-Image and FLUX.2 through the `flowgrpo` command line, on the tiny random pipelines of
tests/helpers/qwen_flux2.py: `preprocess` then `train` on a copy of the model folder whose text
encoder is deleted (the cache serves every prompt), the training variants a user combines
(full fine-tuning, CPS, a Fast window, KL, the awm / nft / reward_filtered / supervised
objectives), `export` (LoRA fused or copied, a full fine-tune swapped in), `sample` and
`eval generate`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from helpers.qwen_flux2 import (GUIDANCE, PAIR, PROMPTS, RECIPES, SIZES, build_models, ode_images, pipeline_class,
                                  pipeline_images, tiny_overrides, write_prompts)
from PIL import Image
from safetensors.torch import load_file

from flowgrpo.models import load_policy
from flowgrpo.runlog import read_metrics

NAMES = ["qwen_image", "flux2"]
SHAPES_PROMPTS = ["a photo of a red circle", "a photo of a blue square"]  # the shapes renderer's grammar


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("new_backends"))


def cli(*args) -> None:
    from flowgrpo.cli import main

    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def textless(models, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """Per backend: a copy of the tiny model, its embedding cache made by `flowgrpo preprocess`,
    then the copy's text encoder and tokenizer deleted, and the prompt file. Every training run
    below uses this copy: training needs no text encoder."""
    root = tmp_path_factory.mktemp("cli_new")
    prompts = write_prompts(root, PROMPTS + SHAPES_PROMPTS)
    out = {}
    for name in NAMES:
        model = root / f"{name}_model"
        shutil.copytree(models[name], model)
        cli("preprocess", "--model", model, "--prompts", prompts, "--out", root / f"{name}_cache")
        assert (root / f"{name}_cache").is_dir()
        shutil.rmtree(model / "text_encoder")
        shutil.rmtree(model / "tokenizer")
        out[name] = (model, root / f"{name}_cache", prompts)
    return out


def cli_train(name: str, textless, out: Path, extra=(), prompts: Path | None = None) -> list[dict]:
    """`flowgrpo train RECIPE overrides...` on the text-encoder-free copy; the iteration rows."""
    model, cache, all_prompts = textless[name]
    over = tiny_overrides(name, model, out, prompts or all_prompts, [f"model.embedding_cache={cache}", *extra])
    cli("train", ROOT / "configs" / "recipes" / RECIPES[name][0], *over)
    return [m for m in read_metrics(out / "metrics.jsonl") if "train/policy_loss" in m]


def lora_moved(run: Path) -> bool:
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    return any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # B starts at 0


# The FLUX.2 recipe holds Pref-GRPO's RatioNorm, per-sample subsets and last-step exclusion, which
# only the ratio objective takes (RatioNorm on flow_sde only); no-ops on the Qwen-Image recipe.
NO_RATIO_OPTIONS = ["optim.ratio_norm=false", "optim.timestep_subset=shared", "optim.timestep_exclude_last=false"]

# variant -> (overrides, iterations); every run is one or two iterations of 2 prompts x 4 images
VARIANTS = {
    "cps": (["sample.kind=cps", "optim.ratio_norm=false"], 1),  # CPS refuses RatioNorm
    "fast_window": (["sample.window_size=2", "sample.window_start_range=[0, 2]"], 2),
    "kl": (["optim.kl_beta=0.1"], 2),
    "awm": (["optim.policy_loss=awm", "optim.kl_beta=0", *NO_RATIO_OPTIONS], 1),
    # deterministic rollouts: each image its own initial noise (the FLUX.2 recipe shares one per group)
    "nft": (["optim.policy_loss=nft", "sample.kind=dpm2", "sample.same_noise_per_group=false",
             "optim.train_guidance=1.0", "optim.kl_beta=0", *NO_RATIO_OPTIONS], 2),
    "reward_filtered": (["optim.policy_loss=reward_filtered", "optim.kl_beta=0", *NO_RATIO_OPTIONS], 1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", NAMES)
def test_training_variants_through_the_cli(textless, tmp_path, name, variant):
    """Each sampler / objective option runs its iterations with a LoRA through the unchanged
    trainer, from the cache alone; the ratio-based ones keep ratio == 1 on the first inner step."""
    extra, iters = VARIANTS[variant]
    rows = cli_train(name, textless, tmp_path / "run", [*extra, f"optim.steps={iters}"])
    assert len(rows) == iters and all(np.isfinite(m["train/policy_loss"]) for m in rows)
    assert lora_moved(tmp_path / "run")
    if variant in ("cps", "fast_window", "kl"):
        assert all(m["train/max_ratio_dev_first"] == 0.0 for m in rows)
    if variant == "fast_window":  # SDE steps only inside the 2-step window: at most 2 trained transitions
        assert all(1 <= m["train/timesteps"] <= 2 for m in rows)
    if variant == "kl":  # the reference equals the policy at the first step only
        assert rows[0]["train/kl"] == 0.0 and rows[1]["train/kl"] > 0.0
    if variant == "nft":
        assert all("train/nft/r_mean" in m and "train/nft/old_distance" in m for m in rows)
        assert rows[-1]["train/nft/old_distance"] > 0
    if variant == "reward_filtered":
        assert 0 < rows[0]["train/rf/selected_share"] <= 1


@pytest.mark.parametrize("name", NAMES)
def test_supervised_objective(textless, tmp_path, name, capsys):
    """Supervised targets come from the shapes renderer: a prompt outside its grammar is refused
    at start-up with the prompt named; shapes prompts train, their renders encoded the way the
    pipeline encodes images (Qwen-Image: one-frame video VAE, latents mean/std; FLUX.2: 2x2
    patchify and batch-norm statistics)."""
    from flowgrpo.cli import main

    model, cache, all_prompts = textless[name]
    over = tiny_overrides(name, model, tmp_path / "bad", all_prompts,
                          [f"model.embedding_cache={cache}", "optim.policy_loss=supervised", "optim.steps=1",
                           *NO_RATIO_OPTIONS])
    assert main(["train", str(ROOT / "configs" / "recipes" / RECIPES[name][0]), *map(str, over)]) == 2
    err = capsys.readouterr().err
    assert "no target provider renders the prompt 'a red circle" in err and "Traceback" not in err
    shapes = write_prompts(tmp_path, SHAPES_PROMPTS)
    rows = cli_train(name, textless, tmp_path / "run", ["optim.policy_loss=supervised", "optim.steps=1",
                                                        "optim.kl_beta=0", *NO_RATIO_OPTIONS], prompts=shapes)
    assert len(rows) == 1 and np.isfinite(rows[0]["train/policy_loss"]) and lora_moved(tmp_path / "run")


@pytest.mark.parametrize("name", NAMES)
def test_render_targets_are_encoded_as_the_pipeline_encodes_images(models, monkeypatch, name):
    """The supervised targets' latents equal the pipelines' own image encoding (with the mode:
    QwenImageImg2ImgPipeline samples the posterior, FLUX.2 takes its argmax)."""
    import functools

    import diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img as qi2i
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline


    from flowgrpo.algorithms.objectives.targets import PROVIDERS

    policy = load_policy(str(models[name]))
    img = PROVIDERS["shapes"].render(SHAPES_PROMPTS[0], None, 0, 16)
    got = PROVIDERS["shapes"].latents(policy, img)
    assert got.shape == (1, *policy.latent_shape(16, 16))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
    if name == "qwen_image":
        monkeypatch.setattr(qi2i, "retrieve_latents", functools.partial(qi2i.retrieve_latents, sample_mode="argmax"))
        want = qi2i.QwenImageImg2ImgPipeline._encode_vae_image(policy.pipe, x[:, :, None], None)[:, :, 0]
    else:
        want = Flux2Pipeline._encode_vae_image(policy.pipe, x, None)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_full_finetune_and_export_the_transformer(models, textless, tmp_path, name):
    """model.lora.enabled=false trains every transformer weight (ratio 1 first); `export
    --transformer` swaps the result into the base pipeline, which then loads and samples."""
    rows = cli_train(name, textless, tmp_path / "run", ["model.lora.enabled=false", "optim.steps=1",
                                                        "optim.lr=1e-3"])
    assert len(rows) == 1 and rows[0]["train/max_ratio_dev_first"] == 0.0
    assert (tmp_path / "run" / "model" / "transformer" / "config.json").is_file()
    out = tmp_path / "exported"
    cli("export", "--model", models[name], "--transformer", tmp_path / "run" / "model", "--out", out,
        "--dtype", "float32")
    tuned = load_policy(str(out))
    trained_w = load_file(next((tmp_path / "run" / "model" / "transformer").glob("*.safetensors")))
    tuned_w = tuned.transformer.state_dict()
    assert trained_w.keys() == tuned_w.keys() and all(torch.equal(tuned_w[k], v) for k, v in trained_w.items())
    base = load_policy(str(models[name]))
    assert (ode_images(tuned, PAIR, GUIDANCE[name]) - ode_images(base, PAIR, GUIDANCE[name])).abs().max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_export_sample_and_eval_generate_with_a_trained_lora(models, textless, tmp_path, name):
    """A LoRA trained through the CLI; `export --merge-lora` gives a folder whose own diffusers
    pipeline reproduces the policy with the LoRA; `export` without it copies the LoRA beside the
    unchanged base; `sample` and `eval generate` write their images (with and without --lora)."""
    g = GUIDANCE[name]
    cli_train(name, textless, tmp_path / "run", ["optim.steps=1", "optim.lr=0.05"])
    lora = tmp_path / "run" / "lora"
    merged, copied = tmp_path / "merged", tmp_path / "copied"
    cli("export", "--model", models[name], "--lora", lora, "--out", merged, "--merge-lora", "--dtype", "float32")
    cli("export", "--model", models[name], "--lora", lora, "--out", copied, "--dtype", "float32")
    assert (merged / "model_index.json").is_file() and not list(merged.rglob("*lora*"))
    assert json.loads((merged / "flowgrpo_defaults.json").read_text())["resolution"] == 16

    policy = load_policy(str(models[name]))
    base = ode_images(policy, PAIR, g)
    policy.load_lora(lora)
    want = ode_images(policy, PAIR, g)
    assert (want - base).abs().max() > 1e-3  # the LoRA moved the images
    pipe = pipeline_class(name).from_pretrained(str(merged))
    pipe.set_progress_bar_config(disable=True)
    pdiff = float(np.abs(pipeline_images(pipe, name, PAIR, g, SIZES[0]) - want.permute(0, 2, 3, 1).numpy()).max())
    mdiff = float((ode_images(load_policy(str(merged)), PAIR, g) - want).abs().max())
    unfused = load_policy(str(copied))
    udiff = float((ode_images(unfused, PAIR, g) - base).abs().max())
    unfused.load_lora(copied / "lora")
    print(name, "merged pipeline vs policy+lora", pdiff, "merged policy", mdiff, "copied base", udiff)
    assert pdiff < 1e-5 and mdiff < 1e-5 and udiff < 1e-6
    assert (ode_images(unfused, PAIR, g) - want).abs().max() < 1e-6

    # sample: seed 0 gives images 0 and 1 the noise of seeds 0 and 1, the model's guidance (4.0)
    for tag, args in (("base", []), ("lora", ["--lora", lora])):
        out = tmp_path / f"samples_{tag}"
        cli("sample", "--model", models[name], "--prompt", PAIR[0], "--n", "2", "--seed", "0", "--steps", "4",
            "--device", "cpu", "--out", out, *args)
        assert sorted(p.name for p in out.glob("*.png")) == ["0000_0.png", "0000_1.png", "grid.png"]
        ours = np.stack([np.asarray(Image.open(out / f"0000_{j}.png")).astype(int) for j in range(2)])
        ref = policy if tag == "lora" else load_policy(str(models[name]))
        want_u8 = (ode_images(ref, [PAIR[0]] * 2, 4.0) * 255).round().permute(0, 2, 3, 1).numpy().astype(int)
        assert ours.shape == (2, 16, 16, 3) and np.abs(ours - want_u8).max() <= 1

    # eval generate: a shapes benchmark slice, images and manifest; with the LoRA too
    common = ["--benchmark", "shapes", "--images-per-prompt", "1", "--steps", "2", "--limit", "2", "--device", "cpu",
              "--quiet"]
    for tag, args in (("base", []), ("lora", ["--lora", lora])):
        out = tmp_path / f"eval_{tag}"
        cli("eval", "generate", *common, "--model", models[name], "--out", out, *args)
        manifest = json.loads((out / "manifest.json").read_text())
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == 2 and np.asarray(Image.open(pngs[0])).shape == (16, 16, 3)
        assert manifest["settings"]["height"] == 16 and manifest["settings"]["steps"] == 2, manifest["settings"]
    a, b = (np.asarray(Image.open(sorted((tmp_path / f"eval_{t}").glob("*.png"))[0])) for t in ("base", "lora"))
    assert not np.array_equal(a, b)

"""A saved LoRA, loaded with no extra arguments, is the trained model: velocities and images
of the reloaded adapter equal the trained policy's, for any rank and alpha, through plain
diffusers `load_lora_weights`, `flowgrpo sample --lora`, `eval shapes --lora` and
`export --merge-lora` (tiny shapes model; the real SD3 and FLUX pipelines in
test_real_models.py). The trained policy is rebuilt from the run's final checkpoint, whose
`trainable.safetensors` holds the raw trained tensors that resume uses."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_cfg, trained_policy
from PIL import Image

from flowgrpo.cli import main
from flowgrpo.data import load_prompts
from flowgrpo.eval.shapes import evaluate_policy, sample_images
from flowgrpo.models import load_policy
from flowgrpo.sampling import rollout
from flowgrpo.trainer import train

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


def velocities(policy, prompts, size, seed=0):
    cond = policy.encode_prompts(prompts)
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(len(prompts), *policy.latent_shape(size, size), generator=g)
    return torch.stack([policy.velocity(lat, s, cond, None, 1.0) for s in (0.9, 0.5, 0.1)])


def ode(policy, prompts, size, guidance=1.0, steps=4):
    init = torch.stack([torch.randn(policy.latent_shape(size, size), generator=torch.Generator().manual_seed(s))
                        for s in range(len(prompts))])
    return rollout(policy, policy.encode_prompts(prompts), policy.encode_prompts([""]), num_steps=steps,
                   guidance=guidance, noise_level=0.0, kind="ode", height=size, width=size,
                   generator=torch.Generator().manual_seed(0), init_latents=init).images


@pytest.fixture(scope="module", params=[(4, 8), (4, 6)], ids=["r4a8", "r4a6"])
def run(request, tiny_shapes_model, tmp_path_factory):
    """Two GRPO iterations with alpha != rank: scale 2 (a power of two) and 1.5."""
    rank, alpha = request.param
    out = tmp_path_factory.mktemp(f"lora_r{rank}a{alpha}")
    train(make_cfg(tiny_shapes_model, out, extra=[f"model.lora.rank={rank}", f"model.lora.alpha={alpha}",
                                                  "data.test=shapes:test", "data.test_tags=[colors]",
                                                  "run.eval_images_per_prompt=2", "run.eval_steps=3",
                                                  "run.eval_guidance=1.0"]))
    return {"out": out, "rank": rank, "alpha": alpha, "model": tiny_shapes_model,
            "policy": trained_policy(tiny_shapes_model, out, rank, alpha)}


def test_plain_diffusers_load_reproduces_the_trained_policy(run):
    from diffusers import StableDiffusion3Pipeline

    trained = run["policy"]
    base = load_policy(str(run["model"]))
    before = velocities(base, PROMPTS, 16)
    want = velocities(trained, PROMPTS, 16)
    assert (want - before).abs().max() > 1e-3  # the two iterations moved the model
    base.pipe.load_lora_weights(str(run["out"] / "lora"))  # diffusers' own call, no scale given
    assert (velocities(base, PROMPTS, 16) - want).abs().max() < 1e-6
    assert (ode(base, PROMPTS, 16) - ode(trained, PROMPTS, 16)).abs().max() < 1e-6
    # and the pipeline's own sampling loop, as README tells users to run it
    pipe = StableDiffusion3Pipeline.from_pretrained(str(run["model"]), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(run["out"] / "lora"))
    got = pipe(PROMPTS, num_inference_steps=4, guidance_scale=2.0, max_sequence_length=1, height=16, width=16,
               output_type="np", generator=[torch.Generator().manual_seed(s) for s in range(2)]).images
    ours = ode(trained, PROMPTS, 16, guidance=2.0).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - ours).max() < 1e-5  # pipeline vs policy sampling parity is 1e-5 (test_shapes_model)


def test_lora_scale_is_a_multiple_of_the_trained_strength(run):
    from peft.tuners.lora import LoraLayer

    base = load_policy(str(run["model"]))
    base.load_lora(run["out"] / "lora", scale=0.5)
    half = trained_policy(run["model"], run["out"], run["rank"], run["alpha"])
    for module in half.transformer.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"] *= 0.5  # half of alpha / r: half the trained update
    assert (velocities(base, PROMPTS, 16) - velocities(half, PROMPTS, 16)).abs().max() < 1e-6


def test_sample_command_reproduces_the_trained_policy(run, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(run["model"]), "--lora", str(run["out"] / "lora"), "--out", str(out),
                 "--prompt", PROMPTS[0], "--n", "3", "--steps", "4", "--guidance", "1.0", "--seed", "5"]) == 0
    got = np.stack([np.asarray(Image.open(out / f"0000_{j}.png").convert("RGB")) for j in range(3)])
    want = sample_images(run["policy"], [PROMPTS[0]] * 3, [5 * 1_000_003 + i for i in range(3)], steps=4,
                         guidance=1.0, resolution=16)
    assert np.array_equal(got, want)


def test_eval_shapes_equals_the_trainers_after_table(run, tmp_path):
    """`eval shapes --lora` on the trainer's test prompts, seed, steps and guidance reads what
    the trainer's own "after" evaluation read."""
    summary = json.loads((run["out"] / "summary.json").read_text())
    out = tmp_path / "eval.json"
    assert main(["eval", "shapes", "--model", str(run["model"]), "--lora", str(run["out"] / "lora"),
                 "--tags", "colors", "--n", "2", "--steps", "3", "--guidance", "1.0", "--seed", "777",
                 "--size", "16", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["per_tag"] == summary["after"]["per_tag"] and got["overall"] == summary["after"]["overall"]
    # and both are the in-memory policy's table, image by image
    records = [it["metadata"] for it in load_prompts("shapes:test", ["colors"])]
    table, _, _ = evaluate_policy(run["policy"], records, images_per_prompt=2, steps=3, guidance=1.0,
                                  resolution=16, seed=777)
    assert table["per_tag"] == got["per_tag"] and table["partial"] == got["partial"]


def test_export_merged_lora_reproduces_the_trained_policy(run, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", "--model", str(run["model"]), "--lora", str(run["out"] / "lora"), "--out", str(out),
                 "--merge-lora", "--dtype", "float32"]) == 0
    merged = load_policy(str(out))
    assert merged.lora is None
    assert (velocities(merged, PROMPTS, 16) - velocities(run["policy"], PROMPTS, 16)).abs().max() < 1e-5
    assert (ode(merged, PROMPTS, 16) - ode(run["policy"], PROMPTS, 16)).abs().max() < 1e-5


def test_checkpoint_lora_folder_is_the_trained_policy_too(run):
    ckpt = sorted((run["out"] / "checkpoints").glob("ckpt-*"))[-1]
    base = load_policy(str(run["model"]))
    base.load_lora(ckpt / "lora")
    assert (velocities(base, PROMPTS, 16) - velocities(run["policy"], PROMPTS, 16)).abs().max() < 1e-6



def test_shipped_model_after_table_equals_eval_shapes(tmp_path):
    """The same equality at the demo's settings on the shipped model, where the verifier's
    numbers are far from zero (on the random tiny model they are mostly 0)."""
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig, validate

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path / "demo"
    cfg = validate(load_config(TrainConfig, root / "configs" / "demo.yaml", [
        "optim.steps=2", "optim.lr=5e-3", "sample.prompts_per_step=2", "sample.group_size=4", "sample.batch_size=8",
        "optim.train_batch_size=8", "data.test_tags=[colors]", "run.eval_images_per_prompt=4", "run.eval_steps=8",
        "run.tensorboard=false", f"run.output_dir={run_dir}"]))
    summary = json.loads(json.dumps(train(cfg)))
    out = tmp_path / "eval.json"
    assert main(["eval", "shapes", "--model", str(root / cfg.model.path), "--lora", str(run_dir / "lora"),
                 "--tags", "colors", "--n", "4", "--steps", "8", "--guidance", "1.0", "--seed", "777",
                 "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert summary["before"]["partial"] != summary["after"]["partial"]  # the LoRA changed the samples
    assert got["per_tag"] == summary["after"]["per_tag"] and got["partial"] == summary["after"]["partial"]

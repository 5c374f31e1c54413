"""model.fold_lora: gradient-free forwards with the LoRA folded into the weights give the adapted
model's velocities (to float rounding), leave every weight as it was, and a run trained with it
follows the run without it."""

import pytest
import torch
from helpers import make_cfg
from safetensors.torch import load_file

from flowgrpo.models import load_policy
from flowgrpo.models.sd3 import LoraSpec
from flowgrpo.runlog import read_metrics
from flowgrpo.trainer import train

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


@pytest.fixture()
def adapted(tiny_shapes_model):
    policy = load_policy(str(tiny_shapes_model))
    torch.manual_seed(0)
    policy.add_lora(LoraSpec(4, 8, "gaussian", []))
    with torch.no_grad():  # B starts at zero: give the adapter an effect to fold
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn(len(PROMPTS), *policy.latent_shape(16, 16), generator=torch.Generator().manual_seed(1))
    return policy, x, cond


def test_folded_forward_is_the_adapted_model_and_every_weight_comes_back(adapted):
    policy, x, cond = adapted
    weights = {k: v.clone() for k, v in policy.transformer.state_dict().items()}
    with torch.no_grad():
        adapted_v = policy.velocity(x, 0.7, cond)
        with policy.reference():
            base_v = policy.velocity(x, 0.7, cond)
    with policy.folded_adapters():
        assert not torch.is_grad_enabled()
        folded_v = policy.velocity(x, 0.7, cond)
    assert (adapted_v - base_v).abs().max() > 0.1  # the adapter does something
    assert torch.allclose(folded_v, adapted_v, atol=1e-5, rtol=1e-5)
    after = policy.transformer.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    with torch.no_grad():  # adapters are back on: the same velocities, bit for bit
        assert torch.equal(policy.velocity(x, 0.7, cond), adapted_v)


def test_folding_leaves_the_reference_alone_and_restores_after_an_error(adapted):
    policy, x, cond = adapted
    with torch.no_grad(), policy.reference():
        base_v = policy.velocity(x, 0.7, cond)
        with policy.folded_adapters():  # adapters switched off: nothing is folded
            assert torch.equal(policy.velocity(x, 0.7, cond), base_v)
    weights = {k: v.clone() for k, v in policy.transformer.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), policy.folded_adapters():
        raise RuntimeError("boom")
    assert all(torch.equal(weights[k], v) for k, v in policy.transformer.state_dict().items())
    with torch.no_grad():
        assert not torch.equal(policy.velocity(x, 0.7, cond), base_v)  # the adapter is on again


def test_folded_loaded_lora_at_a_scale(adapted, tiny_shapes_model, tmp_path):
    policy, x, cond = adapted
    policy.save_trained(tmp_path / "lora")
    loaded = load_policy(str(tiny_shapes_model))
    loaded.load_lora(tmp_path / "lora", scale=0.5)
    with torch.no_grad():
        want = loaded.velocity(x, 0.4, cond)
    with loaded.folded_adapters():
        got = loaded.velocity(x, 0.4, cond)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_a_run_with_folded_rollouts_follows_the_run_without(tiny_shapes_model, tmp_path):
    """NFT folds in its rollouts and its old-policy velocities, and the evaluation folds too."""
    extra = ["optim.policy_loss=nft", "sample.kind=ode", "sample.noise_level=0.0", "sample.guidance=1.0",
             "data.test=shapes:test", "data.test_tags=[colors]", "run.eval_images_per_prompt=2",
             "run.eval_steps=3", "run.eval_guidance=1.0"]
    runs = {}
    for fold in (False, True):
        out = tmp_path / f"fold_{fold}"
        summary = train(make_cfg(tiny_shapes_model, out, steps=3, extra=extra + [f"model.fold_lora={fold}"]))
        runs[fold] = (read_metrics(out / "metrics.jsonl"), summary)
    (plain, plain_summary), (folded, folded_summary) = runs[False], runs[True]
    plain = [r for r in plain if "train/policy_loss" in r]
    folded = [r for r in folded if "train/policy_loss" in r]
    assert len(plain) == len(folded) == 3
    for a, b in zip(plain, folded):
        for key in ("reward/mean", "train/policy_loss", "train/kl", "train/nft/old_distance"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-7), key
    # the trained weights agree to rounding (the evaluation, folded too, ran on them)
    a = load_file(tmp_path / "fold_False" / "checkpoints" / "ckpt-000003" / "trainable.safetensors")
    b = load_file(tmp_path / "fold_True" / "checkpoints" / "ckpt-000003" / "trainable.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3  # and they did move
    assert plain_summary["after"].keys() == folded_summary["after"].keys()


def test_make_demo_trains_all_six_tags_with_folded_rollouts(tmp_path):
    """The config the Makefile's demo target trains: six tags, balanced, folded, and it runs."""
    import re
    from pathlib import Path

    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig, validate
    from flowgrpo.worlds.shapes.grammar import TAGS

    root = Path(__file__).resolve().parents[1]
    makefile = (root / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t.*flowgrpo train (\S+)", makefile, re.M).group(1)
    cfg = validate(load_config(TrainConfig, root / demo))
    assert sorted(cfg.data.train_tags) == sorted(cfg.data.test_tags) == sorted(TAGS)
    assert cfg.data.balance_tags and cfg.model.fold_lora and cfg.model.lora.enabled
    small = validate(load_config(TrainConfig, root / demo, [
        f"model.path={root / cfg.model.path}", "optim.steps=1", "sample.prompts_per_step=2", "sample.group_size=4",
        "run.eval_images_per_tag=6", "run.eval_steps=2", "run.threads=1", "run.tensorboard=false",
        f"run.output_dir={tmp_path}"]))
    summary = train(small)
    assert set(summary["after"]["per_tag"]) >= set(TAGS)

"""DiffusionNFT at its official settings: global-std advantages (hand-computed), flat groups kept
at r = 0.5, a random subset of the sampler's steps per image, CFG-free training velocities and
deterministic rollouts enforced, and a two-iteration run of the recipe's settings on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flowgrpo.algorithms import group_advantages
from flowgrpo.algorithms.objectives import ForwardObjective
from flowgrpo.algorithms.objectives.nft import optimality_probability
from flowgrpo.config import ConfigError, load_config
from flowgrpo.runlog import read_metrics
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import Trainer, train
from helpers import make_cfg

# the recipe's NFT settings on the tiny model (4 sampler steps -> int(4 * 0.99) = 3 trained per image)
OFFICIAL = ["optim.policy_loss=nft", "sample.kind=dpm2", "sample.guidance=1.0", "optim.adv_std=global",
            "optim.drop_zero_signal=false", "optim.timestep_mode=random", "optim.timestep_subset=per_sample",
            "optim.timestep_fraction=0.99", "optim.nft_kl_weight=1e-4", "optim.kl_beta=0"]


def test_global_std_gives_a_lone_success_a_moderate_optimality_probability():
    """One success in 24 binary rewards next to a group with 12: the group's own std maps the
    success to r = 0.98, the batch std (the official) to r = 0.72."""
    rewards = torch.tensor([1.0] + [0.0] * 23 + [1.0] * 12 + [0.0] * 12, dtype=torch.float64)
    ids = torch.tensor([0] * 24 + [1] * 24)
    a_global, _ = group_advantages(rewards, ids, std_mode="global", eps=1e-4)
    a_group, _ = group_advantages(rewards, ids, std_mode="group", eps=1e-4)
    # by hand: the success is 1 - 1/24 = 23/24 above its group's mean; the batch has 13 ones in 48,
    # std sqrt(13 * 35) / 48; the group has 1 in 24, std sqrt(23) / 24
    assert float(a_global[0]) == pytest.approx((23 / 24) / ((13 * 35) ** 0.5 / 48 + 1e-4))
    assert float(a_group[0]) == pytest.approx((23 / 24) / (23 ** 0.5 / 24 + 1e-4))
    r_global, r_group = optimality_probability(a_global[:1], 5.0), optimality_probability(a_group[:1], 5.0)
    assert float(r_global) == pytest.approx(0.7156, abs=1e-3) and float(r_group) == pytest.approx(0.9797, abs=1e-3)
    # a flat group has A = 0 everywhere: r = 0.5, the pull toward the old policy
    flat, _ = group_advantages(torch.tensor([1.0] * 4 + [0.0, 1.0, 0.0, 1.0]), torch.tensor([0] * 4 + [1] * 4),
                               std_mode="global")
    assert optimality_probability(flat[:4], 5.0).tolist() == [0.5] * 4


def _objective(extra: list[str]) -> ForwardObjective:
    cfg = validate(load_config(TrainConfig, None, OFFICIAL + extra))
    return ForwardObjective(cfg, None, SimpleNamespace(seed=3))


def test_per_sample_subsets_of_the_sampler_steps():
    """As the official torch.randperm per sample: each image trains its own random 9 of the 10
    sampler sigmas (fresh noise each); drawn from the image's global index, so redrawing (a
    resume) gives the same subsets."""
    obj = _objective(["sample.num_steps=10"])
    sigmas = torch.linspace(1, 0, 11)
    batch = SimpleNamespace(sigmas=sigmas, global_index=torch.arange(6, 12))
    draws = obj.train_sigmas(batch, iteration=4)
    assert len(draws) == 9 and all(d.shape == (6,) for d in draws)
    per_image = torch.stack(draws, 1)  # (6 images, 9 slots)
    for row in per_image:
        assert len(set(row.tolist())) == 9 and set(row.tolist()) <= set(sigmas[:10].tolist())
    assert len({tuple(r.tolist()) for r in per_image}) > 1  # not the same subset for every image
    again = torch.stack(obj.train_sigmas(batch, iteration=4), 1)
    assert torch.equal(per_image, again)
    # the image with global index 8 draws the same subset whatever batch it is in
    alone = torch.stack(obj.train_sigmas(SimpleNamespace(sigmas=sigmas, global_index=torch.tensor([8])), 4), 1)
    assert torch.equal(alone[0], per_image[2])


def test_nft_refuses_stochastic_rollouts_and_guided_training_unless_asked(tiny_shapes_model, tmp_path):
    with pytest.raises(ConfigError, match="nft_stochastic_rollouts"):
        validate(load_config(TrainConfig, None, ["optim.policy_loss=nft", "sample.kind=flow_sde"]))
    validate(load_config(TrainConfig, None, ["optim.policy_loss=nft", "sample.kind=cps",
                                             "optim.nft_stochastic_rollouts=true"]))
    with pytest.raises(ConfigError, match="train_guidance"):
        validate(load_config(TrainConfig, None, ["optim.train_guidance=1.0"]))  # the ratio objective
    guided = [o for o in OFFICIAL if o != "sample.guidance=1.0"]  # the tiny config samples at CFG 2.0
    with pytest.raises(ConfigError, match="optim.train_guidance: 1.0"):
        Trainer(make_cfg(tiny_shapes_model, tmp_path, extra=guided))
    # asked for: CFG 2.0 in the rollouts, CFG-free velocities in the loss
    trainer = Trainer(make_cfg(tiny_shapes_model, tmp_path, extra=guided + ["optim.train_guidance=1.0"]))
    x = torch.randn(2, *trainer.policy.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    cond = trainer.encode(["a photo of a red circle"] * 2)
    with torch.no_grad():
        assert torch.equal(trainer.velocity(x, 0.5, cond), trainer.policy.velocity(x, 0.5, cond))
        assert not torch.allclose(trainer.velocity(x, 0.5, cond, guidance=2.0), trainer.policy.velocity(x, 0.5, cond))


def test_two_iterations_at_the_official_settings(tiny_shapes_model, tmp_path):
    train(make_cfg(tiny_shapes_model, tmp_path, extra=OFFICIAL))
    rows = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2 and all(m["train/kept_share"] == 1.0 for m in rows)  # flat groups are trained too
    assert all(m["train/timesteps"] == 3 for m in rows)  # 3 per-image slots of the 4 dpm2 steps
    assert rows[-1]["train/nft/old_distance"] > 0


def test_the_official_comparison_benchmark_times_flowgrpo_without_the_checkout(tiny_shapes_model):
    """scripts/bench_nft_official.py's flowgrpo side runs alone (the official side needs a checkout)."""
    import importlib.util
    from argparse import Namespace
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_nft_official.py"
    spec = importlib.util.spec_from_file_location("bench_nft_official", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    side = mod.flowgrpo_side(Namespace(model=str(tiny_shapes_model), prompts=2, group=4, batch=8, iterations=0,
                                       threads=1))
    assert next(side) > 0  # the LoRA's parameters
    sample_s, reward_s, update_s = next(side)
    assert sample_s > 0 and update_s > 0 and reward_s >= 0

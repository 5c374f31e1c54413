"""Training iterations with each reward kind: pairwise win rates (Pref-GRPO) and the
adversarial discriminator (Adv-GRPO), through the same trainer."""

import numpy as np
from safetensors.torch import load_file

from flowgrpo.runlog import read_metrics
from flowgrpo.trainer import train
from helpers import make_cfg


def test_pairwise_winrate_training_iteration_mixed_by_advantage(tiny_shapes_model, tmp_path):
    extra = ["reward.weights={pref_winrate: 0.7, jpeg_compressibility: 1.4}", "reward.mix=advantage",
             "reward.args={pref_winrate: {judge: bradley_terry, both_orders: true, "
             "judge_args: {reward: jpeg_compressibility, tau: 0.001}}}"]
    train(make_cfg(tiny_shapes_model, tmp_path, steps=2, extra=extra))
    rows = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2
    for m in rows:
        # win rates average 0.5 in every group; the judge made G(G-1) calls per group (both orders)
        assert abs(m["reward/pref_winrate/mean"] - 0.5) < 1e-9
        assert m["reward/pref_winrate/judge_calls"] == 2 * 4 * 3
        assert m["train/max_ratio_dev_first"] == 0.0 and np.isfinite(m["train/policy_loss"])


def test_adversarial_reward_trains_alongside_and_resumes(tiny_shapes_model, tmp_path):
    extra = ["reward.weights={adversarial: 1.0, shapes_partial: 0.5}",
             "reward.args={adversarial: {backbone: shapes, references: shapes, lr: 0.001}}",
             "reward.d_steps=1", "reward.d_period=2", "data.train=shapes:train"]
    straight, split = tmp_path / "a", tmp_path / "b"
    train(make_cfg(tiny_shapes_model, straight, steps=4, extra=extra))
    rows = read_metrics(straight / "metrics.jsonl")
    disc = [m for m in rows if "disc/adversarial/d_loss" in m]
    gen = [m for m in rows if "train/policy_loss" in m]
    # d_period 2, d_steps 1: iterations 0 and 2 train the discriminator, 1 and 3 the generator
    assert len(disc) == 2 and len(gen) == 2
    assert all(np.isfinite(m["disc/adversarial/d_loss"]) for m in disc)
    cfg = make_cfg(tiny_shapes_model, split, steps=4, extra=extra + ["run.save_every=2"])
    train(cfg, max_iterations=2)
    train(cfg, resume=True)
    for name in ("trainable.safetensors", "reward_adversarial.safetensors"):
        a = load_file(straight / "checkpoints" / "ckpt-000004" / name)
        b = load_file(split / "checkpoints" / "ckpt-000004" / name)
        assert all((a[k] == b[k]).all() for k in a), name

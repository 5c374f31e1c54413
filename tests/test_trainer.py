import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_checkpoint, make_cfg, tiny_overrides
from safetensors.torch import load_file

from flowgrpo.config import ConfigError, load_config
from flowgrpo.runlog import read_metrics
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def test_two_iterations_ratio_one_kl_zero_and_lora_changes(tiny_shapes_model, tmp_path):
    summary = train(make_cfg(tiny_shapes_model, tmp_path))
    rows = [m for m in read_metrics(tmp_path / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2
    for m in rows:
        assert np.isfinite(m["train/policy_loss"])
        assert m["train/max_ratio_dev_first"] == 0.0  # recomputed log-probs equal the rollout's
        # both components of the weighted mix are logged
        assert "reward/jpeg_compressibility/mean" in m and "reward/shapes_partial/mean" in m
    assert rows[0]["train/kl"] == 0.0  # LoRA B = 0: the policy is the reference before any update
    assert rows[1]["train/kl"] > 0.0
    lora = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())
    assert Path(summary["lora"]).is_dir() and (tmp_path / "plot.png").is_file()


def test_amplification_is_per_reward_under_the_advantage_mix(tiny_shapes_model, tmp_path):
    """The summed reward is never normalised under the advantage mix, so one amplification
    over it would compare unrelated scales: each reward gets its own instead."""
    mixed = tmp_path / "mixed"
    train(make_cfg(tiny_shapes_model, mixed, steps=1, extra=["reward.mix=advantage", "optim.adv_clip=100"]))
    row = next(m for m in read_metrics(mixed / "metrics.jsonl") if "adv/std" in m)
    assert "adv/amplification" not in row
    assert row["adv/jpeg_compressibility/amplification"] > 0
    summed = tmp_path / "summed"
    train(make_cfg(tiny_shapes_model, summed, steps=1, extra=["optim.adv_clip=100"]))
    row = next(m for m in read_metrics(summed / "metrics.jsonl") if "adv/std" in m)
    assert row["adv/amplification"] == pytest.approx(row["adv/std"] / row["reward/group_std"])


def test_saved_lora_loads_in_diffusers_and_changes_output(tiny_shapes_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    train(make_cfg(tiny_shapes_model, tmp_path))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_shapes_model, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a photo of a circle", num_inference_steps=3, guidance_scale=2.0, max_sequence_length=1,
                    height=16, width=16, output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = run()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert not np.allclose(before, run())


def test_resume_equals_no_resume(tiny_shapes_model, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(tiny_shapes_model, straight, steps=4, extra=["optim.ema_decay=0.5", "optim.ema_every=1"]))
    cfg = make_cfg(tiny_shapes_model, split, steps=4, extra=["optim.ema_decay=0.5", "optim.ema_every=1",
                                                             "run.save_every=2"])
    train(cfg, max_iterations=2)
    assert (split / "checkpoints" / "ckpt-000002" / "state.json").is_file()
    train(cfg, resume=True)
    assert_same_checkpoint(straight, split, 4)
    assert_same_checkpoint(straight, split, 4, "ema.safetensors")


def test_prompt_encoding_does_not_depend_on_the_batch(tiny_shapes_model, tmp_path):
    """Which prompts are cached (so were encoded together) differs after a resume: every prompt
    is encoded alone, so its condition is the same whatever was encoded with it."""
    from flowgrpo.trainer import Trainer

    trainer = Trainer(make_cfg(tiny_shapes_model, tmp_path))
    prompts = [it["prompt"] for it in trainer.train_items[:12]]
    together = trainer.encode(prompts)
    for i in (0, 5, 11):
        alone = trainer.policy.encode_prompts([prompts[i]])
        assert all(torch.equal(together[k][i], alone[k][0]) for k in alone)
    fresh = Trainer(make_cfg(tiny_shapes_model, tmp_path))
    later = fresh.encode(prompts[5:7])
    assert all(torch.equal(together[k][5:7], later[k]) for k in later)


def test_demo_resume_is_bit_exact(tmp_path):
    """configs/demo.yaml on the shipped model, cut to 2 small iterations. Seed 2: iteration 1
    draws a prompt of iteration 0 and a new one, so an uninterrupted run has the first cached
    and a resumed one has not (batch-dependent encoding made these runs drift by ~1e-7)."""
    over = ["optim.steps=2", "sample.prompts_per_step=2", "sample.group_size=4", "run.eval_before=false", "data.test=",
            "run.tensorboard=false", "run.threads=1", "run.seed=2",
            f"model.path={ROOT / load_config(TrainConfig, ROOT / 'configs' / 'demo.yaml').model.path}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml", over + [f"run.output_dir={straight}"])))
    cfg = validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml",
                               over + [f"run.output_dir={split}", "run.save_every=1"]))
    train(cfg, max_iterations=1)
    train(cfg, resume=True)
    assert_same_checkpoint(straight, split, 2)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(TrainConfig, None, ["optim.lrr=1"])
    # 4 optimizer steps on one micro-batch cannot be taken: the error names the batch size to use
    with pytest.raises(ConfigError, match="optim.train_batch_size <= 16"):
        validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml", ["optim.optimizer_steps=4"]))
    with pytest.raises(ConfigError, match="optim.steps"):
        load_config(TrainConfig, None, ["optim.steps=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample:\n  group_sise: 4\n")
    with pytest.raises(ConfigError, match="group_sise"):
        load_config(TrainConfig, bad)
    with pytest.raises(ConfigError, match="group_size"):
        validate(load_config(TrainConfig, None, ["sample.group_size=1"]))
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        if cfg.name.startswith(("pretrain", "distill")):
            continue
        validate(load_config(TrainConfig, cfg))
    from flowgrpo.worlds.shapes.distill import DistillConfig

    assert load_config(DistillConfig, ROOT / "configs" / "distill_shapes.yaml").color_noise == 0.5


def _dumped(out: Path) -> dict[int, float]:
    adv = {}
    for f in out.glob("advantages-rank*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            for i, a in zip(row["global_index"], row["advantages"]):
                adv[(row["iteration"], i)] = a
    return adv


def test_two_processes_match_one(tiny_shapes_model, tmp_path):
    """A group spans both processes; gathered advantages equal a single process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = tiny_overrides(tiny_shapes_model, one, 1) + ["run.dump_advantages=true", "sample.prompts_per_step=1",
                                                          "sample.group_size=6", "reward.weights={jpeg_compressibility: 1.0}"]
    cfg = validate(load_config(TrainConfig, None, common))
    train(cfg)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    from flowgrpo.config import save_config

    save_config(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "127.0.0.1:0", "-m", "flowgrpo", "train", str(tmp_path / "cfg.yaml"),
           f"run.output_dir={two}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = sorted(p.name for p in two.glob("advantages-rank*.jsonl"))
    assert ranks == ["advantages-rank0.jsonl", "advantages-rank1.jsonl"]
    a, b = _dumped(one), _dumped(two)
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        assert abs(a[k] - b[k]) < 1e-6, (k, a[k], b[k])


def test_balanced_tags_draw_every_tag_equally(tiny_shapes_model, tmp_path):
    from collections import Counter

    from flowgrpo.trainer import Trainer

    cfg = make_cfg(tiny_shapes_model, tmp_path, extra=["data.balance_tags=true", "sample.prompts_per_step=8"])
    trainer = Trainer(cfg)
    tags = Counter(item["metadata"]["tag"] for it in range(150) for item in trainer.draw_prompts(it))
    assert len(tags) == 6
    shares = np.array(list(tags.values())) / sum(tags.values())
    # unbalanced, color_attr alone would take 38 of 80 training prompts (48%)
    assert shares.max() < 0.22 and shares.min() > 0.12
    assert trainer.draw_prompts(7) == trainer.draw_prompts(7)  # a function of (seed, iteration): resumable


def test_tag_weights_set_the_share_of_each_tag(tiny_shapes_model, tmp_path):
    from collections import Counter

    from flowgrpo.config import ConfigError
    from flowgrpo.trainer import Trainer

    weights = "data.tag_weights={colors: 3.0, position: 0.0}"  # the other four weigh 1: shares 3/7, 0, 1/7 each
    cfg = make_cfg(tiny_shapes_model, tmp_path, extra=["data.balance_tags=true", "sample.prompts_per_step=8", weights])
    trainer = Trainer(cfg)
    tags = Counter(item["metadata"]["tag"] for it in range(150) for item in trainer.draw_prompts(it))
    total = sum(tags.values())
    assert "position" not in tags and len(tags) == 5
    assert abs(tags["colors"] / total - 3 / 7) < 0.05
    assert all(abs(tags[t] / total - 1 / 7) < 0.04 for t in tags if t != "colors")
    assert trainer.draw_prompts(7) == trainer.draw_prompts(7)
    with pytest.raises(ConfigError, match="data.balance_tags"):
        make_cfg(tiny_shapes_model, tmp_path, extra=[weights])
    with pytest.raises(ConfigError, match="data.tag_weights must be >= 0"):
        make_cfg(tiny_shapes_model, tmp_path, extra=["data.balance_tags=true", "data.tag_weights={colors: -1.0}"])
    with pytest.raises(ConfigError, match="no training prompt: \\['colour'\\]"):
        Trainer(make_cfg(tiny_shapes_model, tmp_path, extra=["data.balance_tags=true", "data.tag_weights={colour: 2.0}"]))
    # one tag weighed 0 leaves the others at 1; all of them at 0 leaves nothing to draw
    Trainer(make_cfg(tiny_shapes_model, tmp_path, extra=["data.balance_tags=true", "data.tag_weights={position: 0.0}"]))
    zeros = "{" + ", ".join(f"{t}: 0.0" for t in sorted(set(tags) | {"position"})) + "}"
    with pytest.raises(ConfigError, match="weigh every training tag 0"):
        Trainer(make_cfg(tiny_shapes_model, tmp_path, extra=["data.balance_tags=true", f"data.tag_weights={zeros}"]))


def test_gradient_agreement_script(tiny_shapes_model, tmp_path):
    """scripts/gradient_agreement.py: gradients of independent batches for fixed prompts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gradient_agreement", ROOT / "scripts" / "gradient_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = make_cfg(tiny_shapes_model, tmp_path, extra=["optim.kl_beta=0.0"])
    res = mod.measure(cfg, repeats=3, prompt_seed=0)
    assert -1.0 <= res["cosine_min"] <= res["cosine_mean"] <= 1.0
    assert res["grad_norm"] > 0 and res["mean_grad_norm"] <= res["grad_norm"] + 1e-12


def test_awm_loss_is_advantage_weighted_flow_matching(tiny_shapes_model, tmp_path):
    """optim.policy_loss=awm: the log-prob surrogate is minus the flow-matching loss of the final
    sample at a logit-normal noise level, x_s = (1 - s) x0 + s eps, target eps - x0."""
    from flowgrpo.trainer import Trainer

    cfg = make_cfg(tiny_shapes_model, tmp_path, extra=["optim.policy_loss=awm", "sample.kind=ode"])
    trainer = Trainer(cfg)
    awm = trainer.objective  # algorithms/objectives/awm.py
    batch = trainer.sample(0)
    awm.draws = {0: awm.noise(batch, 0, 0)}
    idx = torch.arange(3)
    with torch.no_grad():
        logp, _ = awm.logp(batch, idx, 0)
        sig, eps = awm.draws[0]
        x0 = batch.latents[idx, -1]
        s = sig[idx].view(-1, 1, 1, 1)
        neg = {k: c.expand(3, *c.shape[1:]) for k, c in trainer.negative.items()}  # the tiny config uses CFG 2
        v = trainer.policy.velocity((1 - s) * x0 + s * eps[idx], sig[idx], {k: c[idx] for k, c in batch.cond.items()},
                                    neg, cfg.sample.guidance)
    expected = -((v - (eps[idx] - x0)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(logp, expected, atol=1e-6)
    assert ((sig > 0) & (sig < 1)).all()
    # the draws depend on the image's global index and the iteration only (resume-exact)
    assert torch.equal(awm.noise(batch, 0, 0)[1], eps)
    assert not torch.equal(awm.noise(batch, 1, 0)[1], eps)


def test_awm_trains_and_resumes_exactly(tiny_shapes_model, tmp_path):
    extra = ["optim.policy_loss=awm", "sample.kind=ode", "optim.inner_epochs=2", "optim.awm_timesteps=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(tiny_shapes_model, straight, steps=4, extra=extra))
    rows = [m for m in read_metrics(straight / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 4 and all(np.isfinite(m["train/policy_loss"]) for m in rows)
    assert all(m["train/max_ratio_dev_first"] == 0.0 for m in rows)  # old surrogates == recomputed ones
    assert rows[1]["train/kl"] > 0.0
    once = tmp_path / "once"
    train(make_cfg(tiny_shapes_model, once, steps=1, extra=extra[:2]))
    first = [m for m in read_metrics(once / "metrics.jsonl") if "train/kl" in m][0]
    assert first["train/kl"] == 0.0  # before any update the policy is the reference
    cfg = make_cfg(tiny_shapes_model, split, steps=4, extra=extra + ["run.save_every=2"])
    train(cfg, max_iterations=2)
    train(cfg, resume=True)
    assert_same_checkpoint(straight, split, 4)
    with pytest.raises(ConfigError, match="policy_loss"):
        validate(load_config(TrainConfig, None, ["optim.policy_loss=dpo"]))
    with pytest.raises(ConfigError, match="sample.kind"):
        validate(load_config(TrainConfig, None, ["sample.kind=ode"]))


def test_learning_rate_schedules_and_their_resume(tiny_shapes_model, tmp_path):
    from types import SimpleNamespace

    from flowgrpo.config import ConfigError
    from flowgrpo.schedules import lr_factor

    o = SimpleNamespace(steps=10, lr_warmup=2, lr_schedule="cosine", lr_min_ratio=0.1, lr_decay_steps=0)
    f = [lr_factor(o, i) for i in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0] and f[-1] > 0.1 and all(a >= b for a, b in zip(f[2:], f[3:]))
    assert lr_factor(SimpleNamespace(**{**vars(o), "lr_schedule": "linear"}), 6) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(SimpleNamespace(**{**vars(o), "lr_schedule": "constant"}), 9) == 1.0
    # warmup-stable-decay: constant until the last 4 iterations, which decay linearly to the floor
    wsd = SimpleNamespace(**{**vars(o), "lr_schedule": "linear", "lr_decay_steps": 4})
    assert [lr_factor(wsd, i) for i in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.775, 0.55, 0.325])
    with pytest.raises(ConfigError, match="lr_schedule"):
        make_cfg(tiny_shapes_model, tmp_path, extra=["optim.lr_schedule=step"])
    with pytest.raises(ConfigError, match="optim.lr_decay_steps"):
        make_cfg(tiny_shapes_model, tmp_path, steps=4, extra=["optim.lr_schedule=linear", "optim.lr_decay_steps=5"])
    with pytest.raises(ConfigError, match="no decay to shape under optim.lr_schedule constant"):
        make_cfg(tiny_shapes_model, tmp_path, steps=4, extra=["optim.lr_decay_steps=2"])
    # the trainer uses it, and a resumed run continues the schedule exactly
    extra = ["optim.lr_schedule=cosine", "optim.lr_warmup=1", "optim.lr_min_ratio=0.0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(tiny_shapes_model, straight, steps=4, extra=extra))
    lrs = [m["lr"] for m in read_metrics(straight / "metrics.jsonl") if "lr" in m]
    cfg = make_cfg(tiny_shapes_model, straight, steps=4, extra=extra)
    assert lrs == pytest.approx([0.01 * lr_factor(cfg.optim, i) for i in range(4)]) and lrs[0] == lrs[1] == 0.01
    cfg = make_cfg(tiny_shapes_model, split, steps=4, extra=extra + ["run.save_every=2"])
    train(cfg, max_iterations=2)
    train(cfg, resume=True)
    assert_same_checkpoint(straight, split, 4)

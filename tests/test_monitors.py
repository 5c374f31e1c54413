"""Gold rewards and hacking alarms (monitors.py): gold never reaches training, each alarm fires on
a hacked stream and stays quiet on noise and on a real unhacked run, stop_on_alarm resumes."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.config import load_config
from flowgrpo.monitors import HackingMonitor, slope_t
from flowgrpo.runlog import read_metrics
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def tiny(model: Path, out: Path, steps: int = 2, extra=()) -> TrainConfig:
    over = [f"model.path={model}", "model.lora.rank=4", "model.lora.alpha=8", "sample.num_steps=4",
            "sample.group_size=4", "sample.prompts_per_step=2", "sample.batch_size=8", "sample.guidance=2.0",
            "optim.train_batch_size=8", f"optim.steps={steps}", "optim.lr=0.01", "optim.clip_range=0.2",
            "run.eval_before=false", "run.tensorboard=false", "data.test=", f"run.output_dir={out}",
            "reward.weights={jpeg_compressibility: 1.0}"]
    return validate(load_config(TrainConfig, None, over + list(extra)))


def _same_run(a: Path, b: Path, step: int) -> None:
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        x = load_file(a / "checkpoints" / f"ckpt-{step:06d}" / name)
        y = load_file(b / "checkpoints" / f"ckpt-{step:06d}" / name)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)


def test_gold_is_logged_and_never_changes_training(tiny_shapes_model, tmp_path):
    plain, gold = tmp_path / "plain", tmp_path / "gold"
    train(tiny(tiny_shapes_model, plain, extra=["run.dump_advantages=true"]))
    train(tiny(tiny_shapes_model, gold, extra=["run.dump_advantages=true",
                                               "reward.gold={shapes_partial: 1.0, shapes_quality: 0.5}"]))
    _same_run(plain, gold, 2)
    assert (plain / "advantages-rank0.jsonl").read_text() == (gold / "advantages-rank0.jsonl").read_text()
    rows = read_metrics(gold / "metrics.jsonl")
    assert all({"gold/shapes_partial", "gold/shapes_quality", "gold/total"} <= set(r) for r in rows)
    r = rows[0]
    assert r["gold/total"] == pytest.approx(r["gold/shapes_partial"] + 0.5 * r["gold/shapes_quality"])
    assert not any("gold/" in k for k in read_metrics(plain / "metrics.jsonl")[0])

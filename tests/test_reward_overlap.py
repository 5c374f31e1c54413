"""Rewards scored while sampling goes on (rewards/pipeline.py): the same training as scoring
after sampling, the same failures, and group rewards judged where the groups are."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.config import load_config
from flowgrpo.rewards import Reward, RewardError, RewardOutput, register
from flowgrpo.rewards.base import merge_info
from flowgrpo.runlog import read_metrics
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
# the demo at a tenth of its size: 2 sampling batches an iteration, a pointwise and a pairwise reward
DEMO_SMALL = ["sample.num_steps=4", "sample.group_size=4", "sample.prompts_per_step=2", "sample.batch_size=4",
              "optim.train_batch_size=8", "optim.steps=3", "run.eval_before=false", "run.tensorboard=false",
              "run.threads=1", "data.test=", "model.lora.rank=4", "model.lora.alpha=8",
              "reward.weights={shapes_partial: 1.0, pref_winrate: 0.5}",
              "reward.args={pref_winrate: {judge: bradley_terry, judge_args: {reward: shapes_partial, tau: 0.1, "
              "sample: true}}}"]


class CountingReward(Reward):
    """Scores each image by its mean brightness; raises on call number `fail_at`, records call times."""

    def __init__(self, fail_at: int = 0, delay: float = 0.0):
        self.fail_at, self.delay, self.calls, self.started = int(fail_at), float(delay), 0, []

    def __call__(self, images, prompts, metadata=None, group_ids=None):
        self.calls += 1
        self.started.append(time.perf_counter())
        time.sleep(self.delay)
        if self.calls == self.fail_at:
            raise RewardError(f"counting reward: call {self.calls} of this run fails")
        return RewardOutput(np.asarray(images, dtype=np.float64).mean(axis=(1, 2, 3)))


register("counting_test")(CountingReward)


def demo_cfg(out: Path, *extra: str):
    return validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml",
                                DEMO_SMALL + [f"run.output_dir={out}", *extra]))


def test_overlap_on_and_off_train_the_same_weights(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    train(demo_cfg(on, "reward.overlap=true"))
    train(demo_cfg(off, "reward.overlap=false"))
    a = load_file(on / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(off / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_on, rows_off = read_metrics(on / "metrics.jsonl"), read_metrics(off / "metrics.jsonl")
    assert len(rows_on) == len(rows_off) == 3
    for x, y in zip(rows_on, rows_off):
        for key in ("train/policy_loss", "reward/mean", "reward/pref_winrate/mean", "reward/shapes_partial/mean",
                    "adv/std", "reward/pref_winrate/judge_calls"):
            assert x[key] == y[key], key


def test_a_failing_reward_fails_the_iteration_with_its_own_error(tmp_path):
    errors = []
    for overlap in ("true", "false"):
        cfg = demo_cfg(tmp_path / overlap, f"reward.overlap={overlap}", "reward.weights={counting_test: 1.0}",
                       "reward.args={counting_test: {fail_at: 2}}")
        with pytest.raises(RewardError) as exc:
            train(cfg)
        errors.append(str(exc.value))
    assert errors[0] == errors[1] == "counting reward: call 2 of this run fails"


def test_rewards_start_before_sampling_ends(tmp_path):
    cfg = demo_cfg(tmp_path, "reward.weights={counting_test: 1.0}", "reward.args={counting_test: {delay: 0.2}}")
    trainer = Trainer(cfg)
    batch = trainer.sample(0)
    sampled = time.perf_counter()
    reward = trainer.rewards["counting_test"]
    _, stats = trainer.score(batch)
    assert reward.calls == 2 and reward.started[0] < sampled  # the first batch was scored while the second sampled
    assert stats["time/reward_compute"] >= 0.4 and 0 <= stats["time/reward_wait"] < stats["time/reward_compute"]


def test_merge_info_adds_counts_and_weighs_rates():
    class Rated(Reward):
        mean_info = ("rate", "per_tag/")

    parts = [(2, {"calls": 3.0, "rate": 0.5, "per_tag/a": 1.0}), (6, {"calls": 1.0, "rate": 0.1, "per_tag/a": np.nan})]
    assert merge_info(Rated(), parts) == {"calls": 4.0, "rate": pytest.approx(0.2), "per_tag/a": 1.0}


def test_groups_are_judged_where_they_are_on_two_processes(tmp_path):
    """Whole groups on each of 2 processes: each judges its own; the advantages equal those of
    every group gathered to the main process, and those of one process."""
    cfg = demo_cfg(tmp_path, "sample.prompts_per_step=4", "reward.weights={jpeg_compressibility: 1.0, "
                   "pref_winrate: 1.0}")
    from flowgrpo.config import save_config

    save_config(cfg, tmp_path / "cfg.yaml")
    one = Trainer(cfg)
    adv_one, _ = one.score(one.sample(0))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "127.0.0.1:0", str(ROOT / "tests" / "two_process_rewards.py"), str(tmp_path / "cfg.yaml"),
           str(tmp_path / "out.json")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["group_calls_per_rank"] == [2, 2]  # each process judged its own two groups
    assert out["per_rank"] == out["gathered"]
    assert out["per_rank"] == adv_one.tolist()


def test_bench_with_a_served_reward_of_fixed_latency(tmp_path):
    from helpers.servers import serve_app

    from flowgrpo.bench import run_bench
    from flowgrpo.rewards import make_reward
    from flowgrpo.rewards.server import DelayedReward, create_app

    slow = DelayedReward(make_reward("shapes_partial"), 0.02)
    with serve_app(create_app(slow)) as url:
        res = run_bench(str(ROOT / "configs" / "demo.yaml"), DEMO_SMALL + [f"run.output_dir={tmp_path}"],
                        iterations=1, remote_reward=url)
    assert res["rewards"] == [f"remote:{url}"] and res["overlap"]
    assert res["reward_compute_s"] >= 8 * 0.02  # 8 images an iteration, each delayed
    assert 0 <= res["reward_s"] and res["iteration_s"] == pytest.approx(res["sample_s"] + res["reward_s"]
                                                                        + res["update_s"])


def test_judge_server_bench_latency_answers_k_comparisons_at_once():
    from helpers.servers import serve_app

    from flowgrpo.rewards.judge_server import create_app
    from flowgrpo.rewards.pairwise import make_judge
    from flowgrpo.rewards.vlm_judge import VLMJudge

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 255, (2, 4, 8, 8, 3), dtype=np.uint8)
    prompts = ["a photo of a red circle"] * 4
    answers = []
    for latency in (0.0, 0.15):
        with serve_app(create_app(make_judge("shapes"), bench_latency=latency, bench_slots=2)) as url:
            start = time.perf_counter()
            res = VLMJudge(base_url=url + "/v1", max_retries=0).judge(prompts, a, b)
            elapsed = time.perf_counter() - start
            assert not res.failed.any()
            answers.append(res.probs.tolist())
    assert answers[0] == answers[1] and elapsed >= 2 * 0.15  # 4 comparisons, 2 at a time

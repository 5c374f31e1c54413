"""Gold rewards and hacking alarms (monitors.py): gold never reaches training, each alarm fires on
a hacked stream and stays quiet on noise and on a real unhacked run, stop_on_alarm resumes."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.config import ConfigError, load_config
from flowgrpo.monitors import HackingMonitor, base_distance, slope_t
from flowgrpo.runlog import read_metrics
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import Trainer, train

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
    # the distance from the base is measured beside gold (after each update: the LoRA has left zero)
    assert all(r["monitor/base_kl"] > 0 for r in rows)
    assert not any("monitor/base_kl" in r for r in read_metrics(plain / "metrics.jsonl"))


def test_base_distance_is_the_mean_squared_velocity_gap_to_the_base(tiny_shapes_model, tmp_path):
    trainer = Trainer(tiny(tiny_shapes_model, tmp_path))
    batch = trainer.sample(0)
    assert base_distance(trainer.velocity, batch, 4, trainer.acc) == 0.0  # LoRA B = 0: the base itself
    with torch.no_grad():
        for p in trainer.named_params.values():
            p.add_(0.01)
    got = base_distance(trainer.velocity, batch, 4, trainer.acc)
    steps = batch.latents.shape[1] - 1
    cond = {k: v[:4] for k, v in batch.cond.items()}
    with torch.no_grad():
        by_hand = np.mean([float((trainer.velocity(batch.latents[:4, j], batch.sigmas[j], cond)
                                  - trainer.velocity(batch.latents[:4, j], batch.sigmas[j], cond, reference=True))
                                 .pow(2).mean()) for j in range(steps)])
    assert got > 0 and got == pytest.approx(by_hand, rel=1e-6)


# ---- synthetic streams ---------------------------------------------------------------------
ONE_PROCESS = SimpleNamespace(num_processes=1, is_main_process=True, device="cpu")


def monitor(*overrides) -> HackingMonitor:
    return HackingMonitor(validate(load_config(TrainConfig, None, list(overrides))), ONE_PROCESS)


def feed_divergence(mon, proxy, gold) -> list[int]:
    """Iterations at which the divergence alarm fired on these curves (the monitor's history reset)."""
    mon.steps, mon.proxy, mon.gold_total = [], [], []
    fired = []
    for it, (p, g) in enumerate(zip(proxy, gold)):
        stats = {"reward/mean": p, "gold/total": g}
        mon.steps.append(it), mon.proxy.append(p), mon.gold_total.append(g)
        if mon._divergence(stats):
            fired.append(it)
    return fired


def test_slope_t_is_a_t_statistic():
    rng = np.random.default_rng(0)
    ts = np.array([slope_t(rng.normal(size=12))[1] for _ in range(4000)])
    assert abs(ts.mean()) < 0.1 and 1.0 < ts.std() < 1.25  # t with 10 dof: sd 1.12
    assert slope_t(np.arange(10.0))[1] == float("inf")


def test_divergence_false_alarms_on_noise_and_honest_progress_are_rare():
    rng = np.random.default_rng(1)
    checks = fired_noise = fired_progress = 0
    mon = monitor()
    for _ in range(300):
        n = 60
        fired_noise += len(feed_divergence(mon, rng.normal(0.5, 0.05, n), rng.normal(0.5, 0.05, n)))
        # the proxy improves for real, gold stays flat: the alarm needs gold to fall
        fired_progress += len(feed_divergence(mon, 0.3 + 0.005 * np.arange(n) + rng.normal(0, 0.05, n),
                                              rng.normal(0.5, 0.05, n)))
        checks += n - 11
    print(f"divergence false alarms per check: noise {fired_noise / checks:.5f}, "
          f"honest progress {fired_progress / checks:.5f} ({checks} checks)")
    assert fired_noise / checks < 1e-3
    assert fired_progress / checks < 0.01  # one-sided 3-SE test on gold alone: 0.7% in theory


def test_divergence_fires_soon_after_gold_turns():
    rng = np.random.default_rng(2)
    n, peak = 80, 40
    proxy = 0.3 + 0.006 * np.arange(n) + rng.normal(0, 0.02, n)
    gold = np.where(np.arange(n) < peak, 0.3 + 0.005 * np.arange(n), 0.5 - 0.006 * (np.arange(n) - peak))
    fired = feed_divergence(monitor(), proxy, gold + rng.normal(0, 0.02, n))
    assert fired and peak < fired[0] <= peak + 12, fired


def feed(mon, check, proxy, gold) -> list[int]:
    """Iterations at which `check` (a bound alarm method) fired on these curves, from a fresh history."""
    mon.steps, mon.proxy, mon.gold_total = [], [], []
    fired = []
    for it, (p, g) in enumerate(zip(proxy, gold)):
        mon.steps.append(it), mon.proxy.append(p), mon.gold_total.append(g)
        if check({"reward/mean": p, "gold/total": g}):
            fired.append(it)
    return fired


def test_gold_drop_catches_a_slow_hack_the_slopes_miss():
    rng = np.random.default_rng(4)
    n, turn = 300, 100
    it = np.arange(n)
    gold = np.where(it < turn, 0.7, 0.7 - 0.002 * (it - turn)) + rng.normal(0, 0.03, n)  # 0.1 lost in 50 iterations
    proxy = 0.8 + 0.0005 * it + rng.normal(0, 0.03, n)
    mon = monitor()
    fired = feed(mon, mon._gold_drop, proxy, gold)
    # the 20-iteration mean is 0.05 down about 25 + 10 iterations after the turn
    assert fired and turn + 25 <= fired[0] <= turn + 60, fired
    assert feed(mon, mon._divergence, proxy, gold) == []  # 12-point slopes: each too noisy to be significant
    # the same fall shared by the proxy (a stretch of hard prompts, an anchored run's dip) is no hack
    assert feed(mon, mon._gold_drop, proxy - 0.002 * np.clip(it - turn, 0, None), gold) == []


def test_gold_drop_false_alarms_on_noise_are_rare():
    rng = np.random.default_rng(5)
    mon, checks, fired = monitor(), 0, 0
    for _ in range(100):
        n = 300
        fired += len(feed(mon, mon._gold_drop, rng.normal(0.8, 0.03, n), rng.normal(0.6, 0.05, n)))
        checks += n - 19
    print(f"gold_drop false alarms per check on noise: {fired / checks:.5f} ({checks} checks)")
    assert fired / checks < 1e-3


def test_divergence_reads_the_judges_own_score_under_a_win_rate(monkeypatch, caplog):
    """A win rate's mean is 0.5 by construction: the alarm reads a weight-0 gold entry instead."""
    import flowgrpo.monitors as monitors

    n, peak = 60, 20
    proxy = 0.3 + 0.008 * np.arange(n)  # the judge's own score climbs
    gold = np.where(np.arange(n) < peak, 0.5, 0.5 - 0.008 * (np.arange(n) - peak))
    rng = np.random.default_rng(3)
    proxy, gold = proxy + rng.normal(0, 0.01, n), gold + rng.normal(0, 0.01, n)
    pairwise = ["reward.weights={pref_winrate: 1.0}", "reward.gold={shapes_partial: 1.0, jpeg_compressibility: 0.0}"]

    def run(*extra) -> list[int]:
        mon = monitor(*pairwise, *extra)
        fired = []
        for it in range(n):
            scores = {"shapes_partial": np.full(4, gold[it]), "jpeg_compressibility": np.full(4, proxy[it])}
            monkeypatch.setattr(monitors, "score_rewards", lambda *a, s=scores: s)
            stats = {"reward/mean": 0.5}
            mon._score_gold(None, stats, it)
            assert stats["gold/total"] == pytest.approx(gold[it])  # weight 0: the judge's score stays out of gold
            if mon._divergence(stats):
                fired.append(it)
        return fired

    with caplog.at_level("WARNING"):
        assert run() == []  # reward/mean is flat: the default key cannot see it
    assert "monitor.proxy_key=gold/" in caplog.text
    fired = run("monitor.proxy_key=gold/jpeg_compressibility")
    assert fired and peak < fired[0] <= peak + 12, fired
    with pytest.raises(ConfigError, match="monitor.proxy_key='gold/pickscore' is not logged"):
        monitor(*pairwise, "monitor.proxy_key=gold/pickscore")


def noise_latents(rng, n, scale=1.0):
    """(n, 3, 4, 8, 8) trajectories whose images' RMS norms spread as a base's do (0.8 to 1.2)."""
    per_image = rng.uniform(0.8, 1.2, (n, 1, 1, 1, 1)) * scale
    return torch.as_tensor(rng.normal(size=(n, 3, 4, 8, 8)) * per_image, dtype=torch.float32)


def batch_of(images, group_size=4, latents=None):
    n = len(images)
    if latents is None:  # fresh noise each batch, seeded by its images: a steady latent norm
        latents = noise_latents(np.random.default_rng(int(images.sum())), n)
    return SimpleNamespace(images=images, group_ids=torch.arange(n) // group_size, prompts=[""] * n,
                           metadata=[{}] * n, latents=latents)


def blobs(rng, n, brightness=0.0):
    """Random coloured squares on grey, one layout per image (a diverse base)."""
    imgs = np.full((n, 32, 32, 3), 128, np.uint8)
    for img in imgs:
        x, y = rng.integers(0, 24, 2)
        img[y:y + 8, x:x + 8] = rng.integers(0, 256, 3)
    return np.clip(imgs.astype(np.float64) + brightness * 255, 0, 255).astype(np.uint8)


def run_images(mon, streams) -> dict[str, list[int]]:
    fired: dict[str, list[int]] = {}
    for it, imgs in enumerate(streams):
        stats = {"reward/mean": 0.5}
        for a in mon.observe(batch_of(imgs), stats, it):
            fired.setdefault(a.name, []).append(it)
    return fired


def test_diversity_alarm_fires_when_groups_collapse_and_not_on_fresh_samples():
    rng = np.random.default_rng(3)
    assert run_images(monitor(), [blobs(rng, 16) for _ in range(30)]) == {}
    collapsed = [blobs(rng, 16) for _ in range(5)] + [np.repeat(blobs(rng, 4), 4, axis=0) for _ in range(10)]
    fired = run_images(monitor(), collapsed)
    assert set(fired) == {"diversity"} and fired["diversity"][0] <= 7


def test_drift_alarm_names_the_statistic_that_moved():
    rng = np.random.default_rng(4)
    stream = [blobs(rng, 16, brightness=0.04 * max(0, it - 4)) for it in range(20)]
    mon = monitor()
    alarms = []
    for it, imgs in enumerate(stream):
        alarms += mon.observe(batch_of(imgs), {"reward/mean": 0.5}, it)
    assert alarms and {a.name for a in alarms} >= {"drift/brightness"}
    msg = next(a.message for a in alarms if a.name == "drift/brightness")
    assert "brightness drift" in msg and "threshold 2" in msg
    # grid artefacts: a checkerboard over the images raises the high-frequency energy
    grid = np.indices((32, 32)).sum(0) % 2 * 60
    hacked = [blobs(rng, 16) for _ in range(4)] + [np.clip(blobs(rng, 16) + grid[None, :, :, None], 0, 255)
                                                   .astype(np.uint8) for _ in range(4)]
    assert "drift/high_freq" in run_images(monitor(), hacked)


def test_latent_norm_drift_fires_when_latents_grow_and_not_on_noise():
    rng = np.random.default_rng(6)
    mon = monitor()
    for it in range(30):  # steady images, fresh noise latents: nothing moves
        assert mon.observe(batch_of(blobs(rng, 16), latents=noise_latents(rng, 16)), {"reward/mean": 0.5}, it) == []
    # the final latents' norm growing 5% an iteration after the base's 5: only this alarm, by iteration 12
    fired, messages = {}, []
    mon = monitor()
    for it in range(20):
        lat = noise_latents(rng, 16, scale=1 + 0.05 * max(0, it - 4))
        for a in mon.observe(batch_of(blobs(rng, 16), latents=lat), {"reward/mean": 0.5}, it):
            fired.setdefault(a.name, []).append(it)
            messages.append(a.message)
    print("latent_norm drift first fired at iteration", fired.get("drift/latent_norm", [None])[0])
    assert set(fired) == {"drift/latent_norm"} and fired["drift/latent_norm"][0] <= 12, fired
    assert messages[0].startswith("latent_norm drift (RMS of the final latents): batch mean 1.")
    # only the final state counts: the noise states before it may be anything
    lat = noise_latents(rng, 16)
    lat[:, :-1] *= 100
    stats = {"reward/mean": 0.5}
    monitor().observe(batch_of(blobs(rng, 16), latents=lat), stats, 0)
    assert 0.9 < stats["monitor/drift/latent_norm"] < 1.1


def test_amplification_alarm_has_a_threshold():
    mon = monitor("monitor.amplification_max=20")
    quiet = [mon.observe(batch_of(blobs(np.random.default_rng(i), 8)), {"reward/mean": 0.5, "adv/amplification": 5.0},
                         i) for i in range(5)]
    assert not any(quiet)
    loud = []
    for i in range(5, 10):
        loud += mon.observe(batch_of(blobs(np.random.default_rng(i), 8)),
                            {"reward/mean": 0.5, "adv/shapes_partial/amplification": 80.0}, i)
    assert loud and loud[0].name == "amplification" and "adv/shapes_partial/amplification" in loud[0].message
    assert loud[0].first and not loud[-1].first


def test_monitor_state_round_trips():
    rng = np.random.default_rng(5)
    a = monitor()
    run_images(a, [blobs(rng, 8) for _ in range(4)])
    b = monitor()
    b.load_state_dict(a.state_dict())
    assert b.base == a.base and b.recent == a.recent and b.fired == a.fired


# ---- real runs -----------------------------------------------------------------------------
def test_stop_on_alarm_stops_with_a_resumable_checkpoint(tiny_shapes_model, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tiny(tiny_shapes_model, straight, steps=3))
    summary = train(tiny(tiny_shapes_model, stopped, steps=3,
                         extra=["run.stop_on_alarm=true", "monitor.amplification_max=1e-6", "monitor.stop_after=1"]))
    assert summary["iterations"] == 1 and summary["stopped_by_alarm"]["iteration"] == 1
    assert "amplification" in summary["stopped_by_alarm"]["alarms"][0]
    assert (stopped / "checkpoints" / "ckpt-000001").is_dir()
    train(tiny(tiny_shapes_model, stopped, steps=3, extra=["monitor.amplification_max=1e-6"]), resume=True)
    _same_run(straight, stopped, 3)
    rows = read_metrics(stopped / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["alarm/amplification"] == 1.0 for r in rows)


def test_stop_on_alarm_waits_for_stop_after_consecutive_alarms(tiny_shapes_model, tmp_path):
    summary = train(tiny(tiny_shapes_model, tmp_path, steps=3,
                         extra=["run.stop_on_alarm=true", "monitor.amplification_max=1e-6", "monitor.stop_after=2"]))
    assert summary["stopped_by_alarm"]["iteration"] == 2
    assert [r["monitor/alarm_streak"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0]
    with pytest.raises(ConfigError, match="monitor.stop_after"):
        tiny(tiny_shapes_model, tmp_path, extra=["monitor.stop_after=0"])


def test_no_alarm_on_a_short_unhacked_shapes_run(tmp_path):
    """The shipped shapes base trained on the verifier's partial credit, gold = strict accuracy:
    an honest run, on which no alarm may fire (the gold windows shortened to see them checked)."""
    over = ["model.path=" + str(ROOT / "assets" / "shapes-sd3"), "sample.num_steps=4", "sample.group_size=4",
            "sample.prompts_per_step=2", "optim.timestep_fraction=0.5", "optim.steps=8", "run.eval_before=false",
            "run.tensorboard=false", "data.test=", f"run.output_dir={tmp_path}",
            "reward.weights={shapes_partial: 1.0}", "reward.gold={shapes_strict: 1.0}", "monitor.window=4",
            "monitor.gold_window=4"]
    train(validate(load_config(TrainConfig, None, over)))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    alarms = {k for r in rows for k in r if k.startswith("alarm/")}
    assert {"alarm/divergence", "alarm/gold_drop", "alarm/diversity", "alarm/amplification",
            "alarm/drift/brightness", "alarm/drift/high_freq", "alarm/drift/latent_norm"} <= alarms
    fired = {(r["step"], k) for r in rows for k in alarms if r.get(k)}
    assert not fired, fired


def test_two_processes_log_the_gold_and_monitors_of_one(tiny_shapes_model, tmp_path):
    """Each process scores its own images for a pointwise gold reward (gathered), a group gold
    reward judges the gathered groups once; the monitors see the gathered batch."""
    import os
    import subprocess
    import sys

    from flowgrpo.config import save_config

    one, two = tmp_path / "one", tmp_path / "two"
    cfg = tiny(tiny_shapes_model, one, steps=1, extra=["sample.prompts_per_step=1", "sample.group_size=6",
                                                       "reward.gold={shapes_partial: 1.0, pref_winrate: 0.5}"])
    train(cfg)
    save_config(cfg, tmp_path / "cfg.yaml")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "127.0.0.1:0", "-m", "flowgrpo", "train", str(tmp_path / "cfg.yaml"),
           f"run.output_dir={two}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_metrics(one / "metrics.jsonl")[0], read_metrics(two / "metrics.jsonl")[0]
    # monitor/base_kl is measured on each process's first local images (the same forwards on every
    # process, as sharded models need), so two processes average other images than one process
    assert a["monitor/base_kl"] > 0 and b["monitor/base_kl"] > 0
    keys = [k for k in a if k.startswith(("gold/", "monitor/")) and k != "monitor/base_kl"]
    assert {"gold/shapes_partial", "gold/pref_winrate", "gold/total", "monitor/diversity/spread",
            "monitor/drift/latent_norm"} <= set(keys)
    for k in keys:
        assert b[k] == pytest.approx(a[k], abs=1e-6), k

"""Training objectives (flowgrpo.algorithms.objectives): formulas on toys, and for every objective
a tiny training run that resumes bit-exactly and gives the same weights on two processes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_cfg
from safetensors.torch import load_file

from flowgrpo.algorithms.objectives import OBJECTIVES, swapped_in
from flowgrpo.algorithms.objectives.nft import ADV_MODES, decay_at, nft_loss, optimality_probability, soft_update
from flowgrpo.algorithms.objectives.reward_filtered import selection_weights, signal_count
from flowgrpo.config import ConfigError, load_config, save_config
from flowgrpo.runlog import read_metrics
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import Trainer, train

# the tiny run of each objective: everything but ratio samples with the deterministic ODE
EXTRA = {
    "ratio": [],
    "awm": ["optim.policy_loss=awm", "sample.kind=ode", "optim.inner_epochs=2"],
    "nft": ["optim.policy_loss=nft", "sample.kind=ode", "sample.guidance=1.0", "optim.nft_decay_type=1",
            "optim.nft_beta=0.5"],
    # rollouts at CFG 2.0 by dpm2, a CFG-free loss on 2 of the first 3 steps with one noise per group
    "dgpo": ["optim.policy_loss=dgpo", "sample.kind=dpm2", "optim.train_guidance=1.0", "optim.fm_rollout_steps=3",
             "optim.timestep_count=2", "optim.timestep_mode=random", "optim.fm_group_noise=true",
             "optim.dgpo_beta=10", "optim.clip_range=0.01"],
    "reward_filtered": ["optim.policy_loss=reward_filtered", "sample.kind=ode", "optim.rf_select=above_mean",
                        "optim.rf_weighted=true"],
    "supervised": ["optim.policy_loss=supervised", "sample.kind=ode", "optim.fm_timesteps=2"],
}


# ---- NFT ------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_optimum_is_bounded(beta):
    """With the adaptive weights held fixed and equal for the + and - terms (the real ones are
    computed per term, so they differ once v != v_old), the loss over a free v is minimised at
    v* = v_old + (2r - 1)(u - v_old) / beta, u = eps - x0: r = 0.5 anchors to v_old."""
    g = torch.Generator().manual_seed(0)
    n = 5
    x0, eps, v_old = (torch.randn(n, 2, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1])
    r = torch.tensor([0.0, 0.25, 0.5, 0.8, 1.0])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    w = torch.full((n, 1, 1, 1), 0.7)
    v = v_old.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nft_loss(v, v_old, x_t, x0, t, r, beta, 5.0, weights=(w, w)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    u = eps - x0
    expected = v_old + (2 * r.view(-1, 1, 1, 1) - 1) * (u - v_old) / beta
    assert torch.allclose(v.detach(), expected, atol=1e-4)
    assert torch.allclose(v.detach()[2], v_old[2], atol=1e-4)  # neutral samples stay at the old policy


def test_nft_gradient_on_policy_is_advantage_weighted_flow_matching():
    """At v = v_old both predictions coincide, so w+ = w- = w, and the gradient is that of
    c mean (v - u)^2 with c = adv_clip t^2 (2r - 1) / w (AWM's, adaptively weighted)."""
    g = torch.Generator().manual_seed(1)
    x0, eps, v_old = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t, r = torch.tensor([0.8, 0.5, 0.2]), torch.tensor([0.9, 0.2, 0.5])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, t, r, beta=0.3, scale=5.0).sum().backward()
    w = (x_t - t.view(-1, 1, 1, 1) * v_old - x0).abs().mean(dim=(1, 2, 3))
    c = (5.0 * t**2 * (2 * r - 1) / w).view(-1, 1, 1, 1)
    u = eps - x0
    fm_grad = c * 2 * (v_old - u) / v_old[0].numel()
    assert torch.allclose(v.grad, fm_grad, atol=1e-6)


def test_optimality_probability_modes():
    adv = torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0])
    expected = {
        "all": [0, 0, 0.25, 0.5, 0.6, 1, 1],
        "positive_only": [0.5, 0.5, 0.5, 0.5, 0.6, 1, 1],
        "negative_only": [0, 0, 0.25, 0.5, 0.5, 0.5, 0.5],
        "binary": [0.4, 0.4, 0.4, 0.5, 0.6, 0.6, 0.6],
        "one_only": [0.5, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6],
    }
    assert set(expected) == set(ADV_MODES)
    for mode, want in expected.items():
        assert torch.allclose(optimality_probability(adv, 5.0, mode), torch.tensor(want)), mode
    with pytest.raises(ValueError, match="adv mode"):
        optimality_probability(adv, 5.0, "sign")


def test_decay_schedules_and_soft_update():
    assert [decay_at(s, 0, constant=0.3) for s in (0, 10, 10_000)] == [0.3, 0.3, 0.3]
    assert [decay_at(s, 1) for s in (0, 1, 100, 500, 900)] == pytest.approx([0, 0.001, 0.1, 0.5, 0.5])
    assert [decay_at(s, 2) for s in (0, 74, 75, 76, 175, 208, 400)] == \
        pytest.approx([0, 0, 0, 0.0075, 0.75, 0.9975, 0.999])
    assert decay_at(20, 1, flat=10, rate=0.01, cap=0.05) == pytest.approx(0.05)
    assert decay_at(12, 2, flat=10, rate=0.01) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="decay type"):
        decay_at(1, 3)
    theta = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    for d in (0.0, 0.25, 1.0):
        old = [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])]
        before = [o.clone() for o in old]
        soft_update(old, theta, d)
        for o, b, p in zip(old, before, theta):
            assert torch.allclose(o, d * b + (1 - d) * p)


def test_nft_samples_with_the_old_weights(tiny_shapes_model, tmp_path):
    cfg = make_cfg(tiny_shapes_model, tmp_path, extra=EXTRA["nft"])
    trainer = Trainer(cfg)
    batch = trainer.sample(0)
    params = list(trainer.named_params.values())
    with torch.no_grad():
        for p in params:
            p.add_(0.05)
    moved = [p.detach().clone() for p in params]
    assert torch.equal(trainer.sample(0).latents, batch.latents)  # theta_old (the initial weights) sampled
    assert all(torch.equal(p, m) for p, m in zip(params, moved))  # and the trained weights are back
    x, cond = batch.latents[:, 0], batch.cond
    with torch.no_grad():
        v_now = trainer.velocity(x, batch.sigmas[0], cond)
        with trainer.objective.sampling_context():
            v_old = trainer.velocity(x, batch.sigmas[0], cond)
        with swapped_in(params, trainer.objective.old):
            assert torch.equal(trainer.velocity(x, batch.sigmas[0], cond), v_old)
    assert not torch.equal(v_now, v_old)  # the moved weights do predict differently


def test_rollout_noise_trains_on_each_images_own_pair(tiny_shapes_model, tmp_path):
    """optim.fm_noise rollout: x_t lies on the straight line from the image's initial noise to
    its sample, so at t = 1 the model sees exactly the noise its rollout started from; the
    noise levels are the fresh run's."""
    fresh = Trainer(make_cfg(tiny_shapes_model, tmp_path / "f", extra=EXTRA["nft"]))
    own = Trainer(make_cfg(tiny_shapes_model, tmp_path / "o", extra=EXTRA["nft"] + ["optim.fm_noise=rollout"]))
    batches = []
    for trainer in (fresh, own):
        batch = trainer.sample(0)
        trainer.score(batch)
        trainer.objective.prepare(batch, 0)
        batches.append(batch)
    assert torch.equal(batches[0].latents, batches[1].latents)
    idx = torch.arange(len(batches[1].latents))
    for k in range(len(own.objective.draws)):
        x0, sig, eps, x_t = own.objective.inputs(idx, k)
        assert torch.equal(eps, batches[1].latents[:, 0].float())
        assert torch.equal(sig, fresh.objective.inputs(idx, k)[1])
        t = sig.view(-1, 1, 1, 1)
        assert torch.equal(x_t, (1 - t) * x0 + t * eps)
        assert not torch.equal(eps, fresh.objective.inputs(idx, k)[2])
    with pytest.raises(ConfigError, match="optim.fm_noise"):
        validate(load_config(TrainConfig, None, ["optim.fm_noise=rollout"]))  # the ratio objective
    with pytest.raises(ConfigError, match="optim.fm_noise"):
        validate(load_config(TrainConfig, None, ["optim.policy_loss=nft", "sample.kind=ode", "optim.fm_noise=own"]))


def test_group_noise_shares_level_and_noise_within_each_group(tiny_shapes_model, tmp_path):
    """optim.fm_group_noise with drawn noise levels (fm_timesteps a number, in fm_sigma_range):
    at each draw every image of a group gets its group's level and noise, so the group's
    advantage-weighted sum compares its images at one x_t-noise; groups draw apart."""
    extra = EXTRA["nft"] + ["optim.fm_timesteps=2", "optim.fm_sigma_range=[0.8,1.0]", "optim.fm_group_noise=true"]
    trainer = Trainer(make_cfg(tiny_shapes_model, tmp_path, extra=extra))
    batch = trainer.sample(0)
    trainer.score(batch)
    trainer.objective.prepare(batch, 0)
    idx, groups = torch.arange(len(batch.latents)), batch.group_ids
    assert len(trainer.objective.draws) == 2 and len(set(groups.tolist())) > 1
    for k in range(2):
        _, sig, eps, _ = trainer.objective.inputs(idx, k)
        assert ((sig >= 0.8) & (sig <= 1.0)).all()
        for g in set(groups.tolist()):
            members = (groups == g).nonzero().flatten()
            assert torch.equal(sig[members], sig[members[:1]].expand(len(members)))
            assert torch.equal(eps[members], eps[members[:1]].expand_as(eps[members]))
        first, other = (groups == groups[0]).nonzero()[0], (groups != groups[0]).nonzero()[0]
        assert not torch.equal(eps[first], eps[other])


# ---- reward-filtered ------------------------------------------------------------------------
def test_reward_filtered_selection():
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0,  # a tie for best: the lower index wins
                        0.0, 0.0, 0.0, 0.0,  # flat: nothing to filter on
                        -0.5, 2.0, -0.5, -1.0])
    ids = torch.arange(12) // 4
    best = selection_weights(adv, ids, "best")
    assert torch.nonzero(best).flatten().tolist() == [0, 9] and best.sum() == 2
    above = selection_weights(adv, ids, "above_mean")
    assert torch.nonzero(above).flatten().tolist() == [0, 2, 9]
    weighted = selection_weights(adv, ids, "above_mean", weighted=True)
    assert torch.allclose(weighted, torch.tensor([1.0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 0, 0], dtype=weighted.dtype))
    assert torch.equal(selection_weights(adv, ids, "best", weighted=True)[[0, 9]], torch.tensor([1.0, 2.0]).double())
    assert signal_count(adv, ids) == 8
    assert torch.equal(selection_weights(adv, ids, "all"), torch.ones(12, dtype=torch.float64))  # the control
    with pytest.raises(ValueError, match="selection"):
        selection_weights(adv, ids, "worst")


# ---- supervised -----------------------------------------------------------------------------
def test_supervised_loss_is_flow_matching_on_renders(tiny_shapes_model, tmp_path):
    from flowgrpo.algorithms.objectives import derived_generator
    from flowgrpo.worlds.shapes.pretrain import _to_tensor
    from flowgrpo.worlds.shapes.render import render

    cfg = make_cfg(tiny_shapes_model, tmp_path, extra=EXTRA["supervised"])
    trainer = Trainer(cfg)
    obj = trainer.objective
    batch = trainer.sample(0)
    steps = trainer.loss_steps(batch, 0)
    assert steps == [0, 1]
    vae = trainer.policy.pipe.vae
    idx = torch.arange(3)
    with torch.no_grad():
        for i in idx.tolist():
            gi = int(batch.global_index[i])
            seed = int(torch.randint(2**62, (1,), generator=derived_generator(cfg.run.seed, 0, 8, gi)))
            img = render(batch.metadata[i], np.random.default_rng(seed), trainer.resolution)
            x = _to_tensor(img[None].copy())  # the pretraining encode path
            lat = (vae.encode(x).latent_dist.mode() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
            assert torch.equal(obj.x0[i:i + 1], lat)
        loss, st = trainer._loss_at(batch, idx, torch.ones(3), 0, torch.zeros(3))
        sig, eps = obj.draws[0]
        x0 = obj.x0[idx]
        s = sig[idx].view(-1, 1, 1, 1)
        v = trainer.velocity((1 - s) * x0 + s * eps[idx], sig[idx], {k: c[idx] for k, c in batch.cond.items()})
    assert abs(st.policy_loss - float(((v - (eps[idx] - x0)) ** 2).mean())) < 1e-6
    assert ((sig > 0) & (sig < 1)).all()  # fm_timesteps 2: logit-normal levels
    first = obj.x0.clone()
    trainer.loss_steps(batch, 0)
    assert torch.equal(obj.x0, first)  # renders are a function of (seed, iteration, image): resumable
    trainer.loss_steps(batch, 1)
    assert not torch.equal(obj.x0, first)


def test_supervised_needs_prompts_with_a_renderer(tiny_shapes_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a dog\n")
    cfg = make_cfg(tiny_shapes_model, tmp_path, extra=EXTRA["supervised"] + [f"data.train={prompts}"])
    with pytest.raises(ValueError, match="no target provider renders the prompt 'a photo of a dog'"):
        Trainer(cfg)


# ---- config -------------------------------------------------------------------------------
def test_config_checks_name_the_key():
    def check(overrides, key):
        with pytest.raises(ConfigError, match=key):
            validate(load_config(TrainConfig, None, overrides))

    check(["optim.policy_loss=dpo"], "optim.policy_loss")
    check(["sample.kind=ode"], "sample.kind")  # the ratio loss needs stochastic steps
    check(["optim.policy_loss=nft", "sample.kind=dpm2", "optim.nft_beta=0"], "optim.nft_beta")
    check(["optim.policy_loss=nft", "sample.kind=dpm2", "optim.nft_adv_mode=sign"], "optim.nft_adv_mode")
    check(["optim.nft_decay_type=3"], "optim.nft_decay_type")
    check(["optim.nft_decay=1.5"], "optim.nft_decay")
    check(["optim.nft_kl_weight=-1"], "optim.nft_kl_weight")
    check(["optim.fm_timesteps=many"], "optim.fm_timesteps")
    check(["optim.rf_select=worst"], "optim.rf_select")
    check(["optim.sup_target=mars"], "optim.sup_target")
    for name in OBJECTIVES:
        if name != "ratio":
            validate(load_config(TrainConfig, None, [f"optim.policy_loss={name}", "sample.kind=ode"]))


# ---- every objective: trains, resumes bit-exactly, two processes = one ---------------------
def _final(out: Path, steps: int = 2) -> dict[str, torch.Tensor]:
    """Trainable tensors and objective state of the last checkpoint."""
    ckpt = out / "checkpoints" / f"ckpt-{steps:06d}"
    state = load_file(ckpt / "trainable.safetensors")
    if (ckpt / "reward_objective.safetensors").is_file():
        state.update({f"objective/{k}": v for k, v in load_file(ckpt / "reward_objective.safetensors").items()})
    return state


# full fine-tuning too: NFT's old copy is then the whole transformer, the reference a frozen copy
RESUMED = {**EXTRA, "nft_full": EXTRA["nft"] + ["model.lora.enabled=false", "optim.lr=1e-4"]}


@pytest.mark.parametrize("name", list(RESUMED))
def test_objective_trains_and_resumes_exactly(name, tiny_shapes_model, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(tiny_shapes_model, straight, extra=RESUMED[name]))
    rows = [m for m in read_metrics(straight / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2 and all(np.isfinite(m["train/policy_loss"]) for m in rows)
    if "optim.inner_epochs=2" not in RESUMED[name]:  # (a second epoch already follows an update)
        assert rows[0]["train/kl"] == 0.0  # LoRA B = 0: the reference itself
    assert rows[1]["train/kl"] > 0  # the policy leaves the reference
    if name.startswith("nft"):
        assert [m["train/nft/decay"] for m in rows] == pytest.approx([0.001, 0.002])  # type 1, 1 step each
        assert rows[0]["train/nft/old_distance"] > 0
    cfg = make_cfg(tiny_shapes_model, split, extra=RESUMED[name] + ["run.save_every=1"])
    train(cfg, max_iterations=1)
    train(cfg, resume=True)
    a, b = _final(straight), _final(split)
    assert a.keys() == b.keys()
    assert any(k.startswith("objective/") for k in a) == name.startswith(("nft", "dgpo"))  # the old copies
    for k in a:
        assert torch.equal(a[k], b[k]), k
    before = load_file(split / "checkpoints" / "ckpt-000001" / "trainable.safetensors")
    assert any(not torch.equal(before[k], a[k]) for k in before)  # the second iteration trained


DRIVER = """
import sys
from flowgrpo.config import load_config
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train
for path in sys.argv[1:]:
    train(validate(load_config(TrainConfig, path, ["run.output_dir=" + path[:-len(".yaml")] + "-two"])))
"""


def test_two_processes_match_one_for_every_objective(tiny_shapes_model, tmp_path):
    """One torchrun launch trains every objective on 2 processes (groups split across them)."""
    configs = []
    for name, extra in EXTRA.items():
        # groups are kept even when flat, so both processes average over the same number of samples
        # 3 groups of 4 over 2 processes: group 1 spans both; one microbatch per process
        cfg = make_cfg(tiny_shapes_model, tmp_path / name, extra=extra + [
            "optim.drop_zero_signal=false", "sample.prompts_per_step=3", "optim.train_batch_size=12",
            "optim.lr=0.001", "run.dump_advantages=true"])  # Adam turns last-bit gradient noise into lr-sized steps where a gradient is ~0
        train(cfg)
        save_config(cfg, tmp_path / f"{name}.yaml")
        configs.append(str(tmp_path / f"{name}.yaml"))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "127.0.0.1:0", str(tmp_path / "driver.py"), *configs]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    gaps = {}
    for name in EXTRA:
        one, two = _final(tmp_path / name), _final(tmp_path / f"{name}-two")
        assert one.keys() == two.keys(), name
        assert (tmp_path / f"{name}-two" / "advantages-rank1.jsonl").is_file()  # it did run on two processes
        gaps[name] = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert max(gaps.values()) < 1e-6, gaps

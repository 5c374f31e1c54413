"""Training-side options that reproduce the official implementations (docs/fidelity.md):
the judged image, per-sample timestep subsets, GDPO batch re-normalisation, RatioNorm and the
discriminator's feature normalisation. Hand-computed examples on small tensors, and the tiny
shapes model for what goes through a rollout or the trainer.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowgrpo.algorithms import batch_renormalize, group_advantages, grpo_loss, mix_advantages, ratio_norm_log_ratio
from flowgrpo.algorithms import select_timesteps, select_timesteps_per_sample
from flowgrpo.algorithms.objectives import Services
from flowgrpo.algorithms.objectives.ratio import RatioObjective
from flowgrpo.config import ConfigError, load_config
from flowgrpo.sampling import rollout, sde_step
from flowgrpo.train_config import TrainConfig, validate


def _cfg(*overrides):
    return validate(load_config(TrainConfig, None, list(overrides)))


# ---- 1. the judged image -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_policy(tiny_shapes_model):
    from flowgrpo.models import load_policy

    return load_policy(str(tiny_shapes_model))


def _rollout(policy, judged, kind="flow_sde"):
    cond = policy.encode_prompts(["a photo of a red circle", "a photo of two blue squares"])
    neg = policy.encode_prompts([""])
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    traj = rollout(policy, cond, neg, num_steps=4, guidance=2.0, noise_level=0.9, kind=kind, height=16, width=16,
                   generator=gens, judged=judged)
    return traj, cond, neg


def test_clean_prediction_image_is_x_minus_sigma_v_of_the_last_step(tiny_policy):
    final, cond, neg = _rollout(tiny_policy, "final")
    clean, _, _ = _rollout(tiny_policy, "clean_prediction")
    torch.testing.assert_close(clean.latents, final.latents)  # the option changes what is decoded, nothing else
    # independently: the velocity at the state before the last step, x0 = x - sigma v, decoded
    x, sigma = clean.latents[:, -2], clean.sigmas[-2]
    with torch.no_grad():
        v = tiny_policy.velocity(x, sigma, cond, {k: t.expand(2, *t.shape[1:]) for k, t in neg.items()}, 2.0)
        expect = tiny_policy.decode(x - sigma * v.float())
        final_img = tiny_policy.decode(final.latents[:, -1])
    assert float(sigma) > 0 and float(clean.sigmas[-1]) == 0.0
    torch.testing.assert_close(clean.images, expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(final.images, final_img, rtol=0, atol=1e-6)
    # the final SDE sample keeps the last step's noise (small here: the shapes schedule's last
    # step starts at sigma 0.001), so the two images differ, far beyond the tolerance above
    assert (clean.images - final.images).abs().max() > 1e-4
    assert (clean.latents[:, -1] - (x - sigma * v.float())).abs().max() > 1e-4
    # with a deterministic last step (ode) the clean prediction is the final sample
    ode_final, _, _ = _rollout(tiny_policy, "final", kind="ode")
    ode_clean, _, _ = _rollout(tiny_policy, "clean_prediction", kind="ode")
    torch.testing.assert_close(ode_clean.images, ode_final.images, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="judged"):
        _rollout(tiny_policy, "clean")


def test_trainer_scores_the_clean_prediction(tiny_shapes_model, tmp_path, monkeypatch):
    from helpers import make_cfg

    import flowgrpo.trainer as trainer_module
    from flowgrpo.rewards import as_uint8_images

    asked = []

    def recording_rollout(*args, **kw):
        asked.append(kw["judged"])
        return rollout(*args, **kw)

    monkeypatch.setattr(trainer_module, "rollout", recording_rollout)
    cfg = make_cfg(tiny_shapes_model, tmp_path, extra=["sample.judged_image=clean_prediction"])
    trainer = trainer_module.Trainer(cfg)
    batch = trainer.sample(0)
    assert asked and set(asked) == {"clean_prediction"}
    x, sigma = batch.latents[:, -2], batch.sigmas[-2]
    with torch.no_grad():
        v = trainer.velocity(x, sigma, batch.cond)
        expect = as_uint8_images(trainer.policy.decode(x - sigma * v.float()))
    assert np.abs(batch.images.astype(int) - expect.astype(int)).max() <= 1  # uint8 rounding of 1e-7 differences
    assert TrainConfig().sample.judged_image == "final"


# ---- 2. per-sample timestep subsets -------------------------------------------------------

def _ratio_objective(*overrides, seed=0):
    cfg = _cfg("optim.timestep_mode=random", *overrides)
    return RatioObjective(cfg, None, Services([], None, seed, 16))


def _fake_batch(global_index, num_steps=10):
    return SimpleNamespace(sde_steps=torch.ones(num_steps, dtype=torch.bool),
                           global_index=torch.as_tensor(global_index))


def test_per_sample_subsets_differ_exclude_the_last_step_and_are_deterministic():
    opts = ("optim.timestep_subset=per_sample", "optim.timestep_exclude_last=true", "optim.timestep_fraction=0.6")
    obj = _ratio_objective(*opts)
    slots = obj.prepare(_fake_batch(range(8)), iteration=3)
    table = obj.step_table
    assert slots == list(range(5)) and table.shape == (8, 5)  # int(9 * 0.6) = 5 of steps 0..8
    rows = {tuple(r) for r in table.tolist()}
    assert len(rows) >= 6  # a fresh subset per sample (8 draws of 5 from 9: collisions are rare)
    assert int(table.max()) <= 8 and int(table.min()) >= 0  # step 9, the last, is never trained
    assert all(len(set(r)) == 5 and list(r) == sorted(r) for r in table.tolist())
    # entry k of sample i is its own step
    assert torch.equal(obj.step_of(torch.tensor([2, 5]), 1), table[[2, 5], 1])
    # deterministic under the seed, new at another iteration or seed
    again = _ratio_objective(*opts)
    again.prepare(_fake_batch(range(8)), iteration=3)
    assert torch.equal(again.step_table, table)
    again.prepare(_fake_batch(range(8)), iteration=4)
    assert not torch.equal(again.step_table, table)
    other = _ratio_objective(*opts, seed=1)
    other.prepare(_fake_batch(range(8)), iteration=3)
    assert not torch.equal(other.step_table, table)
    # an image's subset depends on its global index only: the second of two processes (images 4..7),
    # or a fresh objective after a resume, draws the same rows
    half = _ratio_objective(*opts)
    half.prepare(_fake_batch(range(4, 8)), iteration=3)
    assert torch.equal(half.step_table, table[4:])


def test_shared_subset_default_and_exclude_last():
    obj = _ratio_objective()
    steps = obj.prepare(_fake_batch(range(8)), iteration=0)
    assert obj.step_table is None and obj.step_of(torch.arange(8), steps[0]) == steps[0]
    assert len(steps) == 9  # int(10 * 0.99): the default may pick the last step
    g = torch.Generator().manual_seed(0)
    assert select_timesteps(torch.ones(10, dtype=torch.bool), "first", 1.0, g, exclude_last=True) == list(range(9))
    # with a window the fraction counts the window's steps; the last step only goes when inside it
    window = torch.zeros(10, dtype=torch.bool)
    window[7:] = True
    assert select_timesteps(window, "first", 1.0, exclude_last=True) == [7, 8]
    window = torch.zeros(10, dtype=torch.bool)
    window[2:4] = True
    assert select_timesteps(window, "first", 1.0, exclude_last=True) == [2, 3]
    last_only = torch.zeros(10, dtype=torch.bool)
    last_only[9] = True
    with pytest.raises(ValueError, match="last"):
        select_timesteps_per_sample(last_only, 1.0, [g], exclude_last=True)


def test_ratio_loss_uses_each_samples_own_step():
    """Through RatioObjective.loss with per-sample steps: each sample's transition, sigma and
    stored log-prob are its own step's (hand-built trajectory, linear 'model' v = w x)."""
    obj = _ratio_objective("optim.timestep_subset=per_sample", "optim.timestep_fraction=0.5", "sample.noise_level=0.7",
                           "optim.clip_range=0.2")
    w = torch.tensor(0.3, requires_grad=True)
    obj.services.velocity = lambda x, sigma, cond, reference=False: w * x
    g = torch.Generator().manual_seed(0)
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])
    latents = torch.randn(3, 5, 2, 2, 2, generator=g)
    log_probs = torch.randn(3, 4, generator=g) * 0.01 - 0.9
    batch = SimpleNamespace(sde_steps=torch.ones(4, dtype=torch.bool), global_index=torch.arange(3), latents=latents,
                            sigmas=sigmas, log_probs=log_probs, cond={"e": torch.zeros(3, 1)}, means=None)
    slots = obj.prepare(batch, iteration=0)
    idx, adv = torch.arange(3), torch.tensor([1.0, -0.5, 2.0])
    loss, _ = obj.loss(batch, idx, torch.ones(3), slots[0], adv)
    terms = []
    for i in range(3):
        t = int(obj.step_table[i, 0])
        x = latents[i:i + 1, t]
        out = sde_step(w * x, x, sigmas[t], sigmas[t + 1], noise_level=0.7, prev_sample=latents[i:i + 1, t + 1])
        r = torch.exp(out.log_prob - log_probs[i, t])
        terms.append(torch.maximum(-adv[i] * r, -adv[i] * r.clamp(0.8, 1.2)))
    torch.testing.assert_close(loss, torch.cat(terms).mean())
    assert len({int(obj.step_table[i, 0]) for i in range(3)}) > 1  # the samples really are at different steps


def test_per_sample_trains_and_resumes_exactly(tiny_shapes_model, tmp_path):
    from helpers import assert_same_checkpoint, make_cfg

    from flowgrpo.runlog import read_metrics
    from flowgrpo.trainer import train

    extra = ["optim.timestep_mode=random", "optim.timestep_subset=per_sample", "optim.timestep_exclude_last=true",
             "optim.timestep_fraction=0.6", "optim.ratio_norm=true", "optim.adv_batch_renorm=true",
             "sample.judged_image=clean_prediction"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(make_cfg(tiny_shapes_model, straight, steps=2, extra=extra))
    rows = [m for m in read_metrics(straight / "metrics.jsonl") if "train/policy_loss" in m]
    assert len(rows) == 2 and all(np.isfinite(m["train/policy_loss"]) for m in rows)
    assert all(m["train/max_ratio_dev_first"] == 0.0 for m in rows)  # RatioNorm's ratio is 1 at theta_old too
    assert rows[0]["train/timesteps"] == 1  # int(3 * 0.6) of the 3 steps before the last
    cfg = make_cfg(tiny_shapes_model, split, steps=2, extra=extra + ["run.save_every=1"])
    train(cfg, max_iterations=1)
    train(cfg, resume=True)
    assert_same_checkpoint(straight, split, 2)


# ---- 3. GDPO -------------------------------------------------------------------------------

def test_batch_renormalize_by_hand():
    adv = torch.tensor([1.0, 2.0, 0.0, 0.0, 3.0, -1.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    # mean 5/6; deviations 1/6, 7/6, -5/6, -5/6, 13/6, -11/6: squares sum to 390/36; unbiased: / 5
    mean, std = 5 / 6, math.sqrt((390 / 36) / 5)
    out = batch_renormalize(adv, ids, eps=1e-8, ddof=1)
    expect = torch.tensor([(1 - mean) / (std + 1e-8), (2 - mean) / (std + 1e-8), 0.0, 0.0,
                           (3 - mean) / (std + 1e-8), (-1 - mean) / (std + 1e-8)], dtype=torch.float64)
    torch.testing.assert_close(out, expect)
    assert out[2] == 0 and out[3] == 0  # the flat group stays exactly 0 (it would be dropped)
    pop = batch_renormalize(adv, ids, eps=0.0, ddof=0)
    torch.testing.assert_close(pop[0], torch.tensor((1 - mean) / math.sqrt((390 / 36) / 6), dtype=torch.float64))


def test_gdpo_mix_by_hand_and_clamp_order():
    r3 = math.sqrt(3)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    a = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, 3.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    # unbiased group advantages: a -> [-1, 0, 1 | 0 0 0 | -1, 1, 0]; b -> [-1, -1, 2] / sqrt(3) | 0 | 0
    mixed = [-1 - 0.5 / r3, -0.5 / r3, 1 + 1 / r3, 0, 0, 0, -1, 1, 0]  # 1.0 a + 0.5 b; every group sums to 0
    std = math.sqrt(sum(m * m for m in mixed) / 8)
    renorm = [m / (std + 1e-8) for m in mixed]
    assert renorm[2] > 1.5 and mixed[6] > -1.5  # clip 1.5 binds on the renormalised sum
    parts = {"a": (a, 1.0), "b": (b, 0.5)}
    kw = dict(eps=1e-8, ddof=1, clip=1.5)
    out, _ = mix_advantages(parts, ids, clip_after_mix=True, batch_renorm=True, **kw)
    torch.testing.assert_close(out, torch.tensor(renorm, dtype=torch.float64).clamp(-1.5, 1.5))
    assert float(out[2]) == 1.5 and float(out[3:6].abs().max()) == 0.0
    # the official order (sum, GDPO, clamp) differs from clamping the sum first
    summed, _ = mix_advantages(parts, ids, clip_after_mix=True, **kw)
    assert float(summed[2]) == 1.5 and not torch.allclose(out, batch_renormalize(summed, ids, 1e-8, 1))
    # off by default: the mixed sum as before
    torch.testing.assert_close(summed, torch.tensor(mixed, dtype=torch.float64).clamp(-1.5, 1.5))
    assert TrainConfig().optim.adv_batch_renorm is False


def test_gdpo_with_the_reward_mix_rescales_group_advantages():
    rewards = torch.tensor([0.1, 0.5, 0.9, 0.3, 2.0, 2.0, 1.0, 4.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    plain, _ = group_advantages(rewards, ids, eps=1e-8, clip=100.0, ddof=1)
    renorm, _ = group_advantages(rewards, ids, eps=1e-8, clip=100.0, ddof=1, batch_renorm=True)
    # whole groups sum to 0, so GDPO only rescales: by 1 / (unbiased std of all 8 advantages)
    torch.testing.assert_close(renorm, plain / (plain.std(correction=1) + 1e-8))
    clipped, _ = group_advantages(rewards, ids, eps=1e-8, clip=1.0, ddof=1, batch_renorm=True)
    torch.testing.assert_close(clipped, renorm.clamp(-1, 1))


# ---- 4. RatioNorm --------------------------------------------------------------------------

def test_ratio_norm_by_hand():
    # one-element latents, std 0.5: x' = [0.25, 1.5], mu_old = [0, 1], mu_new = [0.1, 0.8]
    std = torch.full((2, 1, 1, 1), 0.5)
    x_next = torch.tensor([0.25, 1.5]).view(2, 1, 1, 1)
    mu_old, mu_new = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1), torch.tensor([0.1, 0.8]).view(2, 1, 1, 1)

    def logp(mu):
        return (-((x_next - mu) ** 2) / (2 * 0.25) - math.log(0.5) - 0.5 * math.log(2 * math.pi)).view(2)

    # logp_new - logp_old = [0.08, -0.48]; + (mu_new - mu_old)^2 / (2 std^2) = [0.02, 0.08]; * std
    out = ratio_norm_log_ratio(logp(mu_new), logp(mu_old), mu_new, mu_old, std)
    torch.testing.assert_close(out, torch.tensor([0.05, -0.2]))
    # = eps (mu_new - mu_old), eps = (x' - mu_old) / std = [0.5, 1]
    torch.testing.assert_close(out, ((x_next - mu_old) / std * (mu_new - mu_old)).view(2))
    # the clipped loss with each sample divided by |dt| = 0.2: A = [1, -1], clip 0.1
    loss, st = grpo_loss(out, torch.zeros(2), torch.tensor([1.0, -1.0]), 0.1, sample_scale=torch.full((2,), 5.0))
    expect = (-math.exp(0.05) * 5 + 0.9 * 5) / 2  # sample 2: max(e^-0.2, clamp -> 0.9) with A = -1
    assert float(loss) == pytest.approx(expect, rel=1e-6)
    assert st.max_ratio_dev == pytest.approx(1 - math.exp(-0.2), rel=1e-5)
    # a zero std (deterministic step) scores 0
    zero = ratio_norm_log_ratio(logp(mu_new), logp(mu_old), mu_new, mu_old, torch.zeros(2, 1, 1, 1))
    assert torch.equal(zero, torch.zeros(2))


def test_ratio_norm_matches_the_official_formula_on_a_flow_sde_step():
    g = torch.Generator().manual_seed(0)
    x, v_old = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    v_new, noise = v_old + 0.05 * torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    sigma, sigma_next, eta = 0.7, 0.55, 0.7
    old = sde_step(v_old, x, sigma, sigma_next, noise, eta)
    new = sde_step(v_new, x, sigma, sigma_next, noise_level=eta, prev_sample=old.prev_sample)
    ours = ratio_norm_log_ratio(new.log_prob, old.log_prob, new.mean, old.mean, new.std)
    # the official computation, written out: std_dev_t = eta sqrt(sigma / (1 - sigma)), scale = std_dev_t sqrt(|dt|)
    dt = sigma_next - sigma
    sqrt_dt = math.sqrt(abs(dt))
    scale = eta * math.sqrt(sigma / (1 - sigma)) * sqrt_dt
    bias = ((new.mean - old.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * scale**2)
    official = (new.log_prob - old.log_prob + bias) * scale
    torch.testing.assert_close(ours, official, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours, (noise * (new.mean - old.mean)).mean(dim=(1, 2, 3)), rtol=1e-3, atol=1e-6)
    assert ours.abs().max() > 1e-4


def test_ratio_objective_with_ratio_norm():
    obj = _ratio_objective("optim.ratio_norm=true", "optim.timestep_subset=per_sample", "optim.clip_range=0.05",
                           "optim.timestep_fraction=0.5", "sample.noise_level=0.7")
    assert obj.keeps_step_means and not _ratio_objective().keeps_step_means
    w_old, w = 0.3, torch.tensor(0.36, requires_grad=True)
    obj.services.velocity = lambda x, sigma, cond, reference=False: w * x
    g = torch.Generator().manual_seed(1)
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])
    # a real trajectory of the old 'model' v = 0.3 x, keeping means
    xs, means, lps = [torch.randn(3, 2, 2, 2, generator=g)], [], []
    for t in range(4):
        out = sde_step(w_old * xs[-1], xs[-1], sigmas[t], sigmas[t + 1], torch.randn(3, 2, 2, 2, generator=g), 0.7)
        xs.append(out.prev_sample)
        means.append(out.mean)
        lps.append(out.log_prob)
    batch = SimpleNamespace(sde_steps=torch.ones(4, dtype=torch.bool), global_index=torch.arange(3),
                            latents=torch.stack(xs, 1), sigmas=sigmas, log_probs=torch.stack(lps, 1),
                            means=torch.stack(means, 1), cond={"e": torch.zeros(3, 1)})
    slots = obj.prepare(batch, iteration=0)
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, _ = obj.loss(batch, torch.arange(3), torch.ones(3), slots[1], adv)
    terms = []
    for i in range(3):
        t = int(obj.step_table[i, 1])
        x = batch.latents[i:i + 1, t]
        new = sde_step(w * x, x, sigmas[t], sigmas[t + 1], noise_level=0.7, prev_sample=batch.latents[i:i + 1, t + 1])
        sig, dt = float(sigmas[t]), float(sigmas[t] - sigmas[t + 1])
        denom = float(sigmas[t + 1]) if sig == 1.0 else sig  # at sigma = 1 the sampler uses sigma_next there
        scale = 0.7 * math.sqrt(sig / (1 - denom)) * math.sqrt(dt)  # the step's std
        bias = ((new.mean - batch.means[i:i + 1, t]) ** 2).mean() / (2 * scale**2)
        r = torch.exp((new.log_prob - batch.log_probs[i, t] + bias) * scale)
        terms.append(torch.maximum(-adv[i] * r, -adv[i] * r.clamp(0.95, 1.05)) / dt)
    torch.testing.assert_close(loss, torch.cat(terms).mean(), rtol=1e-4, atol=1e-7)
    loss.backward()
    assert w.grad is not None and float(w.grad.abs()) > 0


def test_training_option_validation():
    cfg = _cfg("sample.judged_image=clean_prediction", "optim.timestep_mode=random", "optim.timestep_subset=per_sample",
               "optim.timestep_exclude_last=true", "optim.adv_batch_renorm=true", "optim.ratio_norm=true")
    assert (cfg.sample.judged_image, cfg.optim.timestep_subset, cfg.optim.timestep_exclude_last,
            cfg.optim.adv_batch_renorm, cfg.optim.ratio_norm) == ("clean_prediction", "per_sample", True, True, True)
    d = TrainConfig().optim
    assert (d.timestep_subset, d.timestep_exclude_last, d.adv_batch_renorm, d.ratio_norm) == ("shared", False,
                                                                                              False, False)
    bad = {"sample.judged_image=x0": "judged_image",
           "optim.timestep_subset=per_sample": "timestep_mode random",  # the default mode is first
           "optim.timestep_subset=each": "timestep_subset",
           "optim.ratio_norm=true sample.kind=cps": "ratio_norm",
           "optim.timestep_exclude_last=true optim.policy_loss=nft sample.kind=dpm2": "ratio",
           "optim.timestep_exclude_last=true sample.window_size=1 sample.window_start_range=[0,9]": "last step"}
    for overrides, match in bad.items():
        with pytest.raises(ConfigError, match=match):
            _cfg(*overrides.split())


# ---- 5. discriminator feature normalisation -------------------------------------------------

def test_unit_normalisation_by_hand():
    from flowgrpo.rewards.adversarial import _normalize

    x = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    expect = torch.tensor([[3 / 5.000001, 4 / 5.000001], [0.0, -2 / 2.000001]])  # x / (||x|| + 1e-6)
    torch.testing.assert_close(_normalize(x, "unit"), expect)
    torch.testing.assert_close(_normalize(x, "l2"), torch.tensor([[0.6, 0.8], [0.0, -1.0]]) * math.sqrt(2))
    assert torch.equal(_normalize(x, "none"), x)


def _shapes_images(n=4, seed=0):
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.render import render_batch

    recs = split_records()["train"][:n]
    return recs, [r["prompt"] for r in recs], render_batch(recs, seed=seed)


def _affine_dinov2():
    """A tiny DINOv2 whose final layer norm has a learned-looking affine (as the released models):
    its raw tokens are not already normalised, unlike the shapes backbone's (weight 1, bias 0)."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, mlp_ratio=2))
        with torch.no_grad():
            model.layernorm.weight.copy_(1 + 0.5 * torch.randn(32))
            model.layernorm.bias.copy_(0.5 * torch.randn(32))
    return model


def test_official_discriminator_scores_unit_tokens_and_trains_on_raw_ones():
    import torch.nn.functional as F

    from flowgrpo.rewards import RewardError, make_reward
    from flowgrpo.rewards.adversarial import _gather_patches, load_backbone

    recs, prompts, images = _shapes_images()
    gen = 255 - images
    backbone = load_backbone(_affine_dinov2(), device="cpu")
    kw = dict(backbone=backbone, references="shapes", n_patches=3, seed=3)
    official = make_reward("adversarial", feature_norm="none", score_feature_norm="unit", **kw)
    twin = make_reward("adversarial", feature_norm="none", score_feature_norm="unit", **kw)
    default = make_reward("adversarial", **kw)
    assert default.score_feature_norm == default.feature_norm == "layernorm"

    # scoring: the head on unit-normalised tokens, computed here from the backbone's raw output
    out = official(gen, prompts, recs)
    with torch.no_grad():
        cls, patches = official.backbone(gen)
        unit = lambda t: t / (t.norm(dim=-1, keepdim=True) + 1e-6)  # noqa: E731
        d_cls = official.head(unit(cls)).squeeze(-1)
        d_patch = official.head(unit(patches[:, official.reward_positions()])).squeeze(-1).mean(1)
    np.testing.assert_allclose(out.scores, (0.7 * d_cls + 0.3 * d_patch).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out.scores, default(gen, prompts, recs).scores)

    # training: the hinge loss on raw tokens (the twin replays the same reference and patch draws)
    refs = twin.references.sample(prompts, list(recs), twin.sampler, size=gen.shape[1])
    with torch.no_grad():
        g_cls, g_patch = twin.backbone(gen)
        r_cls, r_patch = twin.backbone(refs)
        g_patch = _gather_patches(g_patch, twin._train_positions(len(gen)))
        r_patch = _gather_patches(r_patch, twin._train_positions(len(gen)))
        d = lambda t: twin.head(t).squeeze(-1)  # noqa: E731
        loss = 0.5 * (F.relu(1 - d(r_cls)).mean() + F.relu(1 + d(g_cls)).mean()) \
            + 0.3 * 0.5 * (F.relu(1 - d(r_patch)).mean() + F.relu(1 + d(g_patch)).mean())
        reward_gen = (0.7 * d(unit(g_cls)) + 0.3 * d(unit(g_patch)).mean(1)).mean()
    stats = official.update(gen, prompts, recs)
    assert stats["d_loss"] == pytest.approx(float(loss), rel=1e-5)
    assert stats["reward_gen"] == pytest.approx(float(reward_gen), rel=1e-5, abs=1e-6)  # as scoring computes it
    # the layer-normed default trains the same initial head on other inputs: another loss (the
    # hinge terms are nearly linear for a fresh head, so the gap is small but 40x the tolerance above)
    assert abs(stats["d_loss"] - default.update(gen, prompts, recs)["d_loss"]) > 5e-4
    with pytest.raises(RewardError, match="score_feature_norm"):
        make_reward("adversarial", score_feature_norm="l1", **kw)


def test_bench_counts_trained_steps_without_the_excluded_last_step():
    from flowgrpo.bench import nfe_per_sample
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig, validate

    def count(*overrides):
        cfg = validate(load_config(TrainConfig, None, ["sample.num_steps=10", "optim.timestep_fraction=1.0",
                                                      *overrides]))
        return nfe_per_sample(cfg)["trained_steps"]

    assert count() == 10 and count("optim.timestep_exclude_last=true") == 9
    # a Fast window that can reach the last step loses it; one that cannot keeps all its steps
    window = ["sample.window_size=2", "sample.window_start_range=[0,8]"]
    assert count(*window) == 2 and count(*window, "optim.timestep_exclude_last=true") == 1
    assert count("sample.window_size=2", "sample.window_start_range=[0,3]", "optim.timestep_exclude_last=true") == 2


# ---- the unconditional branch of CFG training velocities ---------------------------------

def _lora_policy(model):
    from flowgrpo.models import load_policy
    from flowgrpo.models.sd3 import LoraSpec

    policy = load_policy(str(model))
    policy.add_lora(LoraSpec(rank=4, alpha=4, targets=["attn.to_q", "attn.to_v"]))
    with torch.no_grad():  # LoRA B starts at 0: give the adapter a gradient path through A too
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return policy


def _grads(policy, fn):
    params = [p for p in policy.transformer.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    fn().backward()
    return torch.cat([p.grad.flatten() for p in params])


def test_cfg_training_gradient_flows_through_the_prompt_branch_alone_by_default(tiny_shapes_model):
    """The Flow-GRPO reference detaches the unconditional half of its CFG training forward: the
    value is unchanged and the gradient is g times that of the conditional velocity alone."""
    policy = _lora_policy(tiny_shapes_model)
    cond = policy.encode_prompts(["a photo of a red circle", "a photo of two blue squares"])
    neg = {k: v.expand(2, *v.shape[1:]) for k, v in policy.encode_prompts([""]).items()}
    x = torch.randn(2, *policy.latent_shape(16, 16), generator=torch.Generator().manual_seed(0))
    w = torch.randn_like(x)
    g = 4.5
    detached = policy.velocity(x, 0.6, cond, neg, g)
    both = policy.velocity(x, 0.6, cond, neg, g, uncond_grad=True)
    assert torch.equal(detached, both)  # the forward is the same batched pass
    grad_detached = _grads(policy, lambda: (w * policy.velocity(x, 0.6, cond, neg, g)).sum())
    grad_both = _grads(policy, lambda: (w * policy.velocity(x, 0.6, cond, neg, g, uncond_grad=True)).sum())
    grad_text = _grads(policy, lambda: (w * policy.velocity(x, 0.6, cond)).sum())
    grad_uncond = _grads(policy, lambda: (w * policy.velocity(x, 0.6, neg)).sum())
    torch.testing.assert_close(grad_detached, g * grad_text, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_both, g * grad_text + (1 - g) * grad_uncond, rtol=1e-4, atol=1e-6)
    assert (grad_both - grad_detached).abs().max() > 1e-3 * grad_detached.abs().max()


def test_trainer_passes_cfg_uncond_grad_to_the_policy(tiny_shapes_model, tmp_path, monkeypatch):
    from flowgrpo.trainer import Trainer

    from helpers import tiny_overrides

    seen = []
    for flag in (False, True):
        cfg = validate(load_config(TrainConfig, None, tiny_overrides(tiny_shapes_model, tmp_path / str(flag))
                                   + ["sample.guidance=3.0", f"optim.cfg_uncond_grad={str(flag).lower()}"]))
        trainer = Trainer(cfg)
        real = trainer.policy.velocity
        monkeypatch.setattr(trainer.policy, "velocity",
                            lambda *a, **k: (seen.append(k.get("uncond_grad")), real(*a, **k))[1])
        x = torch.randn(1, *trainer.policy.latent_shape(16, 16))
        trainer.velocity(x, 0.5, trainer.policy.encode_prompts(["a photo of a red circle"]))
    assert seen == [False, True]

"""Options that reproduce the official implementations' conventions (docs/fidelity.md).

Each option is checked against its formula on small hand-made tensors, and its default
against today's numbers.
"""

import math

import pytest
import torch

from flowgrpo.algorithms import EMA, group_advantages, mix_advantages
from flowgrpo.config import ConfigError, load_config
from flowgrpo.sampling import gaussian_log_prob, sde_step
from flowgrpo.train_config import TrainConfig, validate


def _cps_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 4, 4, generator=g)
    v_old = torch.randn(3, 2, 4, 4, generator=g)
    v_new = v_old + 0.05 * torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    return x, v_old, v_new, noise


# ---- 1. CPS log-prob convention ----------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cps_reference_log_ratio_is_2_s_squared_times_true(reduction):
    x, v_old, v_new, noise = _cps_case()
    sigma, sigma_next, a = 0.8, 0.6, 0.8
    old = sde_step(v_old, x, sigma, sigma_next, noise, a, "cps", reduction=reduction)
    x_next = old.prev_sample
    lr = {}
    for conv in ("true", "reference"):
        lp_old = sde_step(v_old, x, sigma, sigma_next, noise_level=a, kind="cps", prev_sample=x_next,
                          reduction=reduction, cps_logprob=conv).log_prob
        lp_new = sde_step(v_new, x, sigma, sigma_next, noise_level=a, kind="cps", prev_sample=x_next,
                          reduction=reduction, cps_logprob=conv).log_prob
        lr[conv] = lp_new - lp_old
    s_t = sigma_next * math.sin(a * math.pi / 2)
    assert lr["true"].abs().max() > 1e-4  # the policies differ, so the ratio is not trivially 1
    torch.testing.assert_close(lr["reference"].double(), 2 * s_t**2 * lr["true"].double(), rtol=1e-4, atol=1e-6)


def test_cps_reference_log_prob_is_the_reference_formula():
    x, v, _, noise = _cps_case(1)
    sigma, sigma_next, a = 0.9, 0.7, 0.5
    out = sde_step(v, x, sigma, sigma_next, noise, a, "cps", cps_logprob="reference")
    # written out independently: x0, x1 predictions, CPS mean, score -(x' - mean)^2 averaged per sample
    s_t = sigma_next * math.sin(a * math.pi / 2)
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - s_t**2) * x1
    torch.testing.assert_close(out.prev_sample, mean + s_t * noise)
    torch.testing.assert_close(out.log_prob, (-(out.prev_sample - mean) ** 2).mean(dim=(1, 2, 3)))


def test_cps_default_keeps_the_true_density_and_other_kinds_ignore_the_option():
    x, v, _, noise = _cps_case(2)
    default = sde_step(v, x, 0.8, 0.6, noise, 0.8, "cps")
    s_t = 0.6 * math.sin(0.8 * math.pi / 2)
    expect = gaussian_log_prob(default.prev_sample, default.mean, torch.full((3, 1, 1, 1), s_t))
    torch.testing.assert_close(default.log_prob, expect)
    torch.testing.assert_close(sde_step(v, x, 0.8, 0.6, noise, 0.8, "cps", cps_logprob="true").log_prob,
                               default.log_prob)
    sde = sde_step(v, x, 0.8, 0.6, noise, 0.7, "flow_sde")
    torch.testing.assert_close(sde_step(v, x, 0.8, 0.6, noise, 0.7, "flow_sde", cps_logprob="reference").log_prob,
                               sde.log_prob)
    # the last step (sigma_next = 0) is scored 0 in both conventions
    last = sde_step(v, x, 0.2, 0.0, noise, 0.8, "cps", cps_logprob="reference")
    assert torch.all(last.log_prob == 0)
    with pytest.raises(ValueError, match="cps_logprob"):
        sde_step(v, x, 0.8, 0.6, noise, 0.8, "cps", cps_logprob="refrence")


# ---- 2. advantage std estimator ----------------------------------------------------------

REWARDS = torch.tensor([0.1, 0.5, 0.9, 0.3, 2.0, 2.0, 1.0, 4.0], dtype=torch.float64)
IDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def _by_hand(rewards, ids, ddof, eps, clip=math.inf, std_mode="group"):
    out = torch.zeros_like(rewards)
    n_all = rewards.numel()
    glob = math.sqrt(((rewards - rewards.mean()) ** 2).sum().item() / (n_all - ddof))
    for g in ids.unique():
        r = rewards[ids == g]
        std = math.sqrt(((r - r.mean()) ** 2).sum().item() / (r.numel() - ddof))
        out[ids == g] = (r - r.mean()) / ((std if std_mode == "group" else glob) + eps)
    return out.clamp(-clip, clip)


@pytest.mark.parametrize("std_mode", ["group", "global"])
def test_unbiased_std_and_eps(std_mode):
    adv, st = group_advantages(REWARDS, IDS, std_mode=std_mode, eps=1e-8, clip=100.0, ddof=1)
    torch.testing.assert_close(adv, _by_hand(REWARDS, IDS, 1, 1e-8, std_mode=std_mode))
    # n samples (4 a group, 8 in the batch): the unbiased std is sqrt(n / (n - 1)) times the
    # population one, the advantages that much smaller
    n = 4 if std_mode == "group" else 8
    pop, _ = group_advantages(REWARDS, IDS, std_mode=std_mode, eps=1e-8, clip=100.0, ddof=0)
    torch.testing.assert_close(adv * math.sqrt(n / (n - 1)), pop, rtol=1e-6, atol=1e-9)


def test_default_std_is_population_with_1e_4():
    adv, _ = group_advantages(REWARDS, IDS)
    torch.testing.assert_close(adv, _by_hand(REWARDS, IDS, 0, 1e-4, clip=5.0))
    assert TrainConfig().optim.adv_std_ddof == 0 and TrainConfig().optim.adv_eps == 1e-4
    with pytest.raises(ValueError, match="ddof"):
        group_advantages(REWARDS, IDS, ddof=2)


# ---- 3. clamp before or after mixing -----------------------------------------------------

def test_clip_after_mix_differs_from_per_component_clip():
    # one group of 4; population std of [0, 0, 0, 1] is sqrt(3)/4, so its 1 scores sqrt(3)
    ids = torch.zeros(4, dtype=torch.long)
    a = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    parts = {"a": (a, 1.0), "b": (b, 1.0)}
    r3 = math.sqrt(3)
    before, _ = mix_advantages(parts, ids, eps=0.0, clip=1.5)
    after, _ = mix_advantages(parts, ids, clip_after_mix=True, eps=0.0, clip=1.5)
    # per component: a -> [-1/r3, -1/r3, -1/r3, r3], b -> [r3, -1/r3, -1/r3, -1/r3]
    expect_before = torch.tensor([1.5 - 1 / r3, -2 / r3, -2 / r3, 1.5 - 1 / r3], dtype=torch.float64)
    expect_after = torch.tensor([r3 - 1 / r3, -2 / r3, -2 / r3, r3 - 1 / r3], dtype=torch.float64)
    torch.testing.assert_close(before, expect_before)
    torch.testing.assert_close(after, expect_after)
    assert not torch.allclose(before, after)
    # and the sum is clamped: two components both at sqrt(3) mix to 2 sqrt(3), clamped to 1.5
    same, _ = mix_advantages({"a": (a, 1.0), "a2": (a.clone(), 1.0)}, ids, clip_after_mix=True, eps=0.0, clip=1.5)
    assert float(same[3]) == 1.5
    before_same, _ = mix_advantages({"a": (a, 1.0), "a2": (a.clone(), 1.0)}, ids, eps=0.0, clip=1.5)
    assert float(before_same[3]) == 3.0


def test_mix_default_is_the_sum_of_clamped_components():
    parts = {"x": (REWARDS, 0.7), "y": (REWARDS.flip(0), 1.3)}
    mixed, _ = mix_advantages(parts, IDS, eps=1e-4, clip=0.8)
    expect = 0.7 * group_advantages(REWARDS, IDS, eps=1e-4, clip=0.8)[0] \
        + 1.3 * group_advantages(REWARDS.flip(0), IDS, eps=1e-4, clip=0.8)[0]
    torch.testing.assert_close(mixed, expect)
    assert TrainConfig().optim.adv_clip_after_mix is False


# ---- 4. EMA warm-up ------------------------------------------------------------------------

def _run_ema(ema, p, values, start_step=1):
    for i, val in enumerate(values):
        p.data.fill_(val)
        ema.update(start_step + i)
    return float(ema.shadow[0][0])


def test_ema_warmup_decay_sequence():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([p], decay=0.5, every=1, warmup=True)
    decays = []
    shadow = 0.0
    for n, val in enumerate([1.0, 3.0, -2.0, 5.0, 0.5, 7.0, 1.0, 2.0, 4.0, -1.0, 6.0, 2.5]):
        d = ema.current_decay()
        assert d == pytest.approx(min((1 + n) / (10 + n), 0.5))
        decays.append(d)
        p.data.fill_(val)
        ema.update(n + 1)
        shadow = d * shadow + (1 - d) * val
        assert float(ema.shadow[0][0]) == pytest.approx(shadow, rel=1e-6)
    assert decays[:3] == pytest.approx([0.1, 2 / 11, 0.25])
    assert decays[8:] == pytest.approx([0.5] * 4)  # (1 + 8) / 18 = 0.5 reaches the cap


def test_ema_default_has_no_warmup_and_skipped_steps_do_not_advance_n():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([p], decay=0.9, every=1)
    assert ema.current_decay() == 0.9
    assert _run_ema(ema, p, [1.0]) == pytest.approx(0.1)  # today's: 0.9 * 0 + 0.1 * 1
    warm = EMA([p], decay=0.9, every=4, warmup=True)
    p.data.fill_(1.0)
    for step in (1, 2, 3):
        warm.update(step)
    assert warm.num_updates == 0 and warm.current_decay() == pytest.approx(0.1)
    assert TrainConfig().optim.ema_warmup is False


def test_ema_warmup_resumes_exactly():
    values = [1.0, 3.0, -2.0, 5.0, 0.5, 7.0]
    p = torch.nn.Parameter(torch.zeros(1))
    straight = _run_ema(EMA([p], decay=0.9, every=1, warmup=True), p, values)
    q = torch.nn.Parameter(torch.zeros(1))
    first = EMA([q], decay=0.9, every=1, warmup=True)
    _run_ema(first, q, values[:3])
    # what a checkpoint keeps: the shadow tensors and num_updates (state.json "ema_updates")
    state, n = {k: v.clone() for k, v in first.state_dict().items()}, first.num_updates
    resumed = EMA([q], decay=0.9, every=1, warmup=True)
    resumed.load_state_dict(state, n)
    assert _run_ema(resumed, q, values[3:], start_step=4) == straight
    # without restoring n the schedule would restart and the result differ
    restarted = EMA([q], decay=0.9, every=1, warmup=True)
    restarted.load_state_dict(state, 0)
    assert _run_ema(restarted, q, values[3:], start_step=4) != pytest.approx(straight)


# ---- config ------------------------------------------------------------------------------

def test_config_fields_and_validation():
    cfg = validate(load_config(TrainConfig, None, ["sample.kind=cps", "sample.cps_logprob=reference",
                                                   "optim.adv_std_ddof=1", "optim.adv_eps=1e-8",
                                                   "optim.adv_clip_after_mix=true", "optim.ema_warmup=true"]))
    assert (cfg.sample.cps_logprob, cfg.optim.adv_std_ddof, cfg.optim.adv_clip_after_mix, cfg.optim.ema_warmup) \
        == ("reference", 1, True, True)
    assert TrainConfig().sample.cps_logprob == "true"
    with pytest.raises(ConfigError, match="cps_logprob"):
        validate(load_config(TrainConfig, None, ["sample.cps_logprob=official"]))
    with pytest.raises(ConfigError, match="adv_std_ddof"):
        validate(load_config(TrainConfig, None, ["optim.adv_std_ddof=2"]))

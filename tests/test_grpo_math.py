import torch

from flowgrpo.algorithms import EMA, group_advantages, grpo_loss, kl_to_reference, mix_advantages, select_timesteps
from flowgrpo.algorithms.advantages import group_ids_from_prompts


def test_illusory_advantage_example_from_the_paper():
    # Pref-GRPO's example: tiny score gaps (std 0.0026) become advantages of +-1.4
    scores = torch.tensor([0.3457, 0.3530, 0.3496, 0.3494])
    ids = torch.zeros(4, dtype=torch.long)
    adv, st = group_advantages(scores, ids, eps=0.0)
    assert torch.allclose(adv, torch.tensor([-1.44, 1.38, 0.07, -0.01]), atol=0.01)
    assert abs(st.reward_std - 0.0026) < 1e-4
    wins = torch.tensor([0.0, 0.67, 1.0, 0.33])
    adv_w, _ = group_advantages(wins, ids, eps=0.0)
    assert torch.allclose(adv_w, torch.tensor([-1.34, 0.46, 1.34, -0.46]), atol=0.01)


def test_group_vs_global_std_eps_clip_and_zero_signal():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, st = group_advantages(r, ids, std_mode="group", eps=1e-4)
    g_std = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False)
    assert torch.allclose(adv[:3], (r[:3] - 2) / (g_std + 1e-4), atol=1e-6)
    assert torch.equal(adv[3:], torch.zeros(3))
    assert st.zero_signal_groups == 1 and st.n_groups == 2
    adv_g, _ = group_advantages(r, ids, std_mode="global", eps=1e-4)
    assert torch.allclose(adv_g[:3], (r[:3] - 2) / (r.std(unbiased=False) + 1e-4), atol=1e-6)
    big, _ = group_advantages(torch.tensor([0.0] * 99 + [1.0]), torch.zeros(100, dtype=torch.long), clip=5.0)
    assert big.max() == 5.0


def test_mixing_by_advantage_normalises_each_reward_separately():
    ids = torch.tensor([0, 0, 0, 0])
    pref = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    clip = torch.tensor([0.30, 0.31, 0.29, 0.30])
    mixed, stats = mix_advantages({"pref": (pref, 0.7), "clip": (clip, 1.4)}, ids, eps=1e-4)
    a_pref, _ = group_advantages(pref, ids)
    a_clip, _ = group_advantages(clip, ids)
    assert torch.allclose(mixed, 0.7 * a_pref + 1.4 * a_clip)
    assert set(stats) == {"pref", "clip"}


def test_group_ids_follow_prompt_order():
    assert group_ids_from_prompts(["b", "b", "a", "a", "b"]).tolist() == [0, 0, 1, 1, 0]


def test_loss_at_ratio_one_is_minus_mean_advantage_and_clips():
    lp = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, st = grpo_loss(lp, torch.zeros(3), adv, clip_range=0.2)
    assert abs(float(loss.detach()) + adv.mean()) < 1e-7 and st.max_ratio_dev == 0 and st.clip_fraction == 0
    loss.backward()
    assert torch.allclose(lp.grad, -adv / 3)
    # ratio far above 1 + eps with A > 0: clipped, no gradient
    lp2 = torch.tensor([1.0], requires_grad=True)
    loss2, st2 = grpo_loss(lp2, torch.zeros(1), torch.tensor([1.0]), clip_range=0.2)
    loss2.backward()
    assert lp2.grad.abs().item() == 0 and st2.clip_fraction == 1.0
    assert abs(float(loss2) + 1.2) < 1e-6


def test_padding_weights_and_kl():
    lp = torch.zeros(4, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 5.0, 5.0])
    w = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss, _ = grpo_loss(lp, torch.zeros(4), adv, 0.1, kl=torch.tensor([0.0, 0.0, 9.0, 9.0]), kl_beta=1.0, weights=w)
    assert abs(float(loss) + 1.0) < 1e-6
    m = torch.zeros(2, 3, 4, 4)
    assert torch.equal(kl_to_reference(m, m, torch.ones(2, 1, 1, 1)), torch.zeros(2))
    ref = torch.ones(2, 3, 4, 4)
    assert torch.allclose(kl_to_reference(m, ref, torch.full((2, 1, 1, 1), 0.5)), torch.full((2,), 2.0))


def test_timestep_selection():
    full = torch.ones(10, dtype=torch.bool)
    assert select_timesteps(full, "first", 0.99) == list(range(9))
    window = torch.tensor([False, False, True, True, True, False])
    assert select_timesteps(window, "first", 1.0) == [2, 3, 4]
    a = select_timesteps(full, "random", 0.6, torch.Generator().manual_seed(1))
    b = select_timesteps(full, "random", 0.6, torch.Generator().manual_seed(1))
    assert a == b and len(a) == 6 and a == sorted(a)


def test_ema_tracks_and_swaps():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5, every=2)
    with torch.no_grad():
        p.add_(2.0)
    ema.update(1)  # not a multiple of every: skipped
    assert torch.equal(ema.shadow[0], torch.zeros(3))
    ema.update(2)
    assert torch.allclose(ema.shadow[0], torch.ones(3))
    with ema.swapped_in():
        assert torch.allclose(p, torch.ones(3))
    assert torch.allclose(p, torch.full((3,), 2.0))

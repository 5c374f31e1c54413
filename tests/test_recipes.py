"""The GPU recipes: each loads and validates, its reward arguments are ones the rewards take, and
the recipes that copy a paper hold the official values listed in docs/fidelity.md (CPU, no model
is loaded)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flowgrpo.config import load_config
from flowgrpo.train_config import TrainConfig, validate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))


def recipe(name: str) -> TrainConfig:
    return validate(load_config(TrainConfig, ROOT / "configs" / "recipes" / name))


def reward_args(cfg: TrainConfig) -> dict:
    args = cfg.reward.args
    return args if isinstance(args, dict) else OmegaConf.to_container(args)


def _params(fn) -> tuple[set[str], bool]:
    sig = inspect.signature(fn)
    names = {n for n, p in sig.parameters.items()
             if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _accepted(chain) -> set[str]:
    """Keyword arguments a factory takes, following **kwargs into the next callable of the chain."""
    out: set[str] = set()
    for fn in chain:
        names, more = _params(fn)
        out |= names
        if not more:
            break
    return out


def constructor_chains() -> dict[str, list]:
    from flowgrpo.rewards import adversarial, clip, geneval, ocr, remote
    from flowgrpo.rewards.base import _REGISTRY, _import_builtin

    _import_builtin()
    return {
        "clip": [_REGISTRY["clip"], clip.ClipTextImageReward.__init__],
        "pickscore": [_REGISTRY["pickscore"], clip.ClipTextImageReward.__init__],
        "adversarial": [adversarial.AdversarialReward.__init__],
        "ocr": [_REGISTRY["ocr"], ocr.OcrReward.__init__],
        "hpsv2": [_REGISTRY["hpsv2"], clip.HpsV2Reward.__init__],
        "geneval": [_REGISTRY["geneval"], geneval.GenevalReward.__init__, remote.RemoteReward.__init__],
    }


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_validates_and_its_reward_args_are_accepted(path):
    cfg = validate(load_config(TrainConfig, path))
    head = path.read_text().split("\nmodel:")[0]
    assert "flowgrpo train configs/recipes/" + path.name in head and "GPU" in head
    assert "docs/fidelity.md" in head, "every recipe points to its fidelity rows"
    args = reward_args(cfg)
    assert set(args) <= set(cfg.reward.weights) | {"adversarial"}
    chains = constructor_chains()
    for name, kwargs in args.items():
        if name == "pref_winrate":
            from flowgrpo.rewards.base import make_reward

            make_reward(name, **kwargs)  # builds the VLM judge: checks every judge_args key, no request sent
            continue
        unknown = set(kwargs) - _accepted(chains[name])
        assert not unknown, f"{path.name}: reward.args.{name} has unknown keys {sorted(unknown)}"


def test_every_recipe_has_a_section_in_the_fidelity_table():
    text = (ROOT / "docs" / "fidelity.md").read_text()
    for path in RECIPES:
        assert f"`{path.name}`" in text, path.name


@pytest.mark.parametrize("name", ["flux_dev_prefgrpo.yaml", "qwen_image_prefgrpo.yaml"])
def test_pref_grpo_recipes_hold_the_official_values(name):
    """CodeGoat24/Pref-GRPO scripts/_common_finetune.sh and scripts/lora/lora_ur_think_prefgrpo_*.sh."""
    cfg = recipe(name)
    s, o, r = cfg.sample, cfg.optim, cfg.reward
    assert (s.group_size, s.prompts_per_step, o.optimizer_steps, o.steps) == (8, 64, 2, 471)
    assert s.resolution == 720 and s.noise_level == 0.7 and s.kind == "flow_sde" and cfg.model.shift == 3.0
    assert s.same_noise_per_group and s.judged_image == "clean_prediction"
    assert (o.clip_range, o.kl_beta, o.adv_clip, o.max_grad_norm, o.weight_decay) == (1e-4, 0.0, 5.0, 1.0, 1e-4)
    assert (o.adv_std, o.adv_std_ddof, o.adv_eps) == ("group", 1, 1e-8)
    assert o.adv_clip_after_mix and o.adv_batch_renorm and o.ratio_norm
    assert (o.timestep_mode, o.timestep_fraction, o.timestep_subset) == ("random", 0.6, "per_sample")
    assert o.timestep_exclude_last  # --ignore_last
    assert o.ema_decay == 0.0
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.init) == (64, 128, "kaiming")
    assert r.mix == "advantage" and r.weights == {"pref_winrate": 0.4, "clip": 0.6}
    judge = reward_args(cfg)["pref_winrate"]["judge_args"]
    assert (judge["image_format"], judge["image_quality"], judge["max_tokens"]) == ("JPEG", 95, 4096)
    assert judge["parser"] == "official" and judge["parse_retries"] == 0 and judge["temperature"] is None
    clip = reward_args(cfg)["clip"]
    assert clip["backend"] == "open_clip" and clip["model"].startswith("ViT-H-14:")
    assert "dfn5b" in clip["model"].lower()
    if name.startswith("flux_dev"):
        assert (s.num_steps, s.guidance, o.lr) == (25, 3.5, 1e-5)
    else:  # Qwen-Image: 20 steps, no CFG, lr 1e-4
        assert (s.num_steps, s.guidance, o.lr) == (20, 1.0, 1e-4)


def test_adv_grpo_recipe_holds_the_official_values():
    """showlab/Adv-GRPO config/grpo.py:dino_cotrain_sd3_patch_fast, scripts/train_sd3_fast_dino_patch.py."""
    cfg = recipe("sd35m_advgrpo.yaml")
    s, o, r = cfg.sample, cfg.optim, cfg.reward
    assert (s.kind, s.cps_logprob, s.noise_level) == ("cps", "reference", 0.8)
    assert (s.window_size, list(s.window_start_range)) == (2, [0, 0]) and o.timestep_fraction == 1.0
    assert (s.num_steps, s.guidance, s.resolution) == (10, 4.5, 512)
    assert (s.group_size, s.prompts_per_step, o.optimizer_steps) == (16, 48, 2)
    assert (o.clip_range, o.kl_beta, o.lr, o.adv_std) == (1e-5, 0.0, 3e-4, "global")
    assert (r.d_steps, r.d_period) == (9, 10)
    # the official loop stops once its global step (+1 a discriminator iteration, +2 a generator
    # one) reaches 1,000: 91 periods of 10 iterations
    periods = o.steps // r.d_period
    assert o.steps % r.d_period == 0 and periods * (r.d_steps + 2 * (r.d_period - r.d_steps)) >= 1000
    assert (periods - 1) * (r.d_steps + 2) + r.d_steps < 1000
    assert o.ema_decay == 0.9 and o.ema_warmup and o.ema_every == r.d_period
    adv = reward_args(cfg)["adversarial"]
    assert (adv["feature_norm"], adv["score_feature_norm"]) == ("none", "unit")
    assert (adv["lr"], list(adv["betas"])) == (1e-4, [0.5, 0.999]) and adv["backbone"] == "facebook/dinov2-base"
    assert cfg.model.max_sequence_length == 128
    assert "--model Qwen/Qwen-Image" in (ROOT / "configs" / "recipes" / "sd35m_advgrpo.yaml").read_text()


def test_flux2_pref_grpo_recipe_holds_the_flux1_official_values():
    """No official FLUX.2 [dev] script: the FLUX.1-dev Pref-GRPO settings, at 512 px and guidance 4.0."""
    cfg, flux1 = recipe("flux2_prefgrpo.yaml"), recipe("flux_dev_prefgrpo.yaml")
    s, o = cfg.sample, cfg.optim
    assert (s.num_steps, s.noise_level, s.kind, cfg.model.shift, s.resolution, s.guidance) == (25, 0.7, "flow_sde",
                                                                                               3.0, 512, 4.0)
    assert s.same_noise_per_group and s.judged_image == "clean_prediction"
    assert (s.group_size, s.prompts_per_step, o.optimizer_steps, o.steps) == (8, 64, 2, 471)
    assert o.ratio_norm and o.adv_batch_renorm and o.timestep_exclude_last
    assert (o.timestep_mode, o.timestep_fraction, o.timestep_subset) == ("random", 0.6, "per_sample")
    same = ("lr", "clip_range", "kl_beta", "adv_std", "adv_std_ddof", "adv_eps", "adv_clip", "adv_clip_after_mix",
            "max_grad_norm", "weight_decay", "ema_decay")
    assert [getattr(o, k) for k in same] == [getattr(flux1.optim, k) for k in same]
    assert cfg.reward.mix == "advantage" and cfg.reward.weights == flux1.reward.weights
    assert reward_args(cfg) == reward_args(flux1)
    # CPS and the other objectives run it with the three ratio options off
    for extra in (["sample.kind=cps", "optim.ratio_norm=false"],
                  ["optim.policy_loss=nft", "sample.kind=dpm2", "sample.same_noise_per_group=false",
                   "optim.ratio_norm=false", "optim.timestep_subset=shared",
                   "optim.timestep_exclude_last=false"]):
        validate(load_config(TrainConfig, ROOT / "configs" / "recipes" / "flux2_prefgrpo.yaml", extra))


def test_flow_grpo_fast_recipe_holds_the_official_values():
    """yifan123/flow_grpo config/grpo.py:pickscore_sd3_fast_nocfg."""
    cfg = recipe("sd35m_fast_nocfg.yaml")
    s, o = cfg.sample, cfg.optim
    assert (s.kind, s.cps_logprob, s.noise_level, s.guidance, cfg.run.eval_guidance) == ("cps", "reference", 0.8,
                                                                                           1.0, 1.0)
    assert (s.group_size, s.prompts_per_step, o.optimizer_steps) == (18, 64, 2)
    # sde_window_size 3 from a start randint(0, 10 // 2 - 3): every step of the window trained
    assert (s.num_steps, s.window_size, list(s.window_start_range), o.timestep_fraction) == (10, 3, [0, 2], 1.0)
    assert (o.clip_range, o.kl_beta, o.lr, o.adv_std) == (1e-5, 0.0, 3e-4, "global")
    assert (o.ema_decay, o.ema_every, o.ema_warmup) == (0.9, 4, True)
    assert cfg.model.max_sequence_length == 128 and reward_args(cfg)["pickscore"]["dtype"] == "float32"


@pytest.mark.parametrize("name,kl", [("sd35m_geneval.yaml", 0.04), ("sd35m_ocr.yaml", 0.04),
                                     ("sd35m_pickscore.yaml", 0.01)])
def test_flow_grpo_sd35_recipes_hold_the_official_values(name, kl):
    """yifan123/flow_grpo config/grpo.py: geneval_sd3, general_ocr_sd3, pickscore_sd3 (32 GPUs)."""
    cfg = recipe(name)
    s, o = cfg.sample, cfg.optim
    assert (s.kind, s.noise_level, s.num_steps, s.guidance, s.resolution) == ("flow_sde", 0.7, 10, 4.5, 512)
    assert (s.group_size, s.prompts_per_step, o.optimizer_steps) == (24, 48, 2)
    assert (o.lr, o.clip_range, o.kl_beta, o.adv_std, o.adv_std_ddof, o.adv_eps) == (3e-4, 1e-4, kl, "global",
                                                                                         0, 1e-4)
    assert (o.timestep_mode, o.timestep_fraction) == ("first", 0.99)
    assert (o.ema_decay, o.ema_every, o.ema_warmup) == (0.9, 4, True)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.init) == (32, 64, "gaussian")
    assert cfg.model.max_sequence_length == 128


@pytest.mark.parametrize("name,steps,beta,decay,opt_steps", [
    ("sd35m_nft_geneval.yaml", 10, 1.0, 1, 1), ("sd35m_nft_ocr.yaml", 10, 0.1, 2, 2),
    ("sd35m_nft_pickscore.yaml", 10, 1.0, 1, 1), ("sd35m_nft_multireward.yaml", 25, 0.1, 1, 1)])
def test_diffusion_nft_recipes_hold_the_official_values(name, steps, beta, decay, opt_steps):
    """NVlabs/DiffusionNFT config/nft.py (_get_config, sd3_geneval / sd3_ocr / sd3_pickscore /
    sd3_multi_reward) and config/base.py, trained by scripts/train_nft_sd3.py on 8 GPUs."""
    cfg = recipe(name)
    s, o, m = cfg.sample, cfg.optim, cfg.model
    assert (s.kind, s.guidance, s.num_steps, s.resolution) == ("dpm2", 1.0, steps, 512)  # solver dpm2, CFG-free
    assert (s.group_size, s.prompts_per_step, o.optimizer_steps) == (24, 48, opt_steps)
    assert (o.policy_loss, o.nft_beta, o.nft_decay_type, o.nft_adv_mode, o.nft_kl_weight) == ("nft", beta, decay,
                                                                                            "all", 1e-4)
    assert o.nft_decay_flat is None and o.nft_decay_rate is None and o.nft_decay_max is None  # the type's constants
    assert (o.adv_std, o.adv_std_ddof, o.adv_eps, o.adv_clip) == ("global", 0, 1e-4, 5.0)
    assert o.drop_zero_signal is False  # flat groups trained at r = 0.5
    # a random int(N * 0.99) of the N sampler steps, drawn per image (torch.randperm per sample)
    assert (o.fm_timesteps, o.timestep_mode, o.timestep_subset, o.timestep_fraction) == ("rollout", "random",
                                                                                       "per_sample", 0.99)
    assert o.fm_sigma_range is None and o.timestep_count is None and o.fm_rollout_steps is None
    assert (o.lr, list(o.betas), o.weight_decay, o.max_grad_norm) == (3e-4, [0.9, 0.999], 1e-4, 1.0)
    assert o.train_guidance is None and not o.nft_stochastic_rollouts
    assert (o.ema_decay, o.ema_every, o.ema_warmup) == (0.9, 1, True)
    assert (m.lora.rank, m.lora.alpha, m.lora.init, m.max_sequence_length) == (32, 64, "gaussian", 128)
    assert (cfg.run.eval_steps, cfg.run.eval_guidance, cfg.run.save_every) == (40, 1.0, 30)
    weights = {"sd35m_nft_geneval.yaml": {"geneval": 1.0}, "sd35m_nft_ocr.yaml": {"ocr": 1.0},
               "sd35m_nft_pickscore.yaml": {"pickscore": 1.0},
               # the official sums pickscore + hpsv2 + clipscore (its clipscore the plain cosine: 0.3 x 100 cos / 30)
               "sd35m_nft_multireward.yaml": {"pickscore": 1.0, "hpsv2": 1.0, "clipscore": 0.3}}[name]
    assert cfg.reward.weights == weights and cfg.reward.mix == "reward"


@pytest.mark.parametrize("name,group,pool,kl,clip,beta,switch,adv_std", [
    ("sd35m_dgpo_geneval.yaml", 16, 5, 0.02, 1e-2, 100.0, 500, "group"),
    ("sd35m_dgpo_ocr.yaml", 16, 7, 0.02, 1e-2, 100.0, 200, "global"),
    ("sd35m_dgpo_pickscore.yaml", 24, 7, 0.001, 5e-2, 10.0, 200, "global")])
def test_dgpo_recipes_hold_the_official_values(name, group, pool, kl, clip, beta, switch, adv_std):
    """Luo-Yihong/DGPO config/dgpo.py (geneval_sd3_4gpu, general_ocr_sd3_4gpu, pickscore_sd3_4gpu on
    compressibility()) and config/base.py, trained by scripts/train_sd3_dgpo.py on 4 GPUs."""
    cfg = recipe(name)
    s, o, m = cfg.sample, cfg.optim, cfg.model
    assert (s.kind, s.guidance, s.num_steps, s.resolution) == ("dpm2", 4.5, 10, 512)
    assert (s.group_size, s.prompts_per_step, o.optimizer_steps) == (group, 8, 1)
    assert (o.policy_loss, o.train_guidance, o.dgpo_ref_guidance, o.dgpo_ref) == ("dgpo", 1.0, 1.0, "base")
    assert (o.dgpo_beta, o.dgpo_clip, o.clip_range, o.kl_beta) == (beta, True, clip, kl)
    assert (o.dgpo_old_decay_rate, o.dgpo_old_decay_max, o.dgpo_sample_old_after) == (0.001, 0.3, switch)
    # num_train_timesteps 4 drawn from steps 0..trunc_steps, shared by all images; use_shared_noise
    assert (o.fm_timesteps, o.fm_rollout_steps, o.timestep_count, o.timestep_mode, o.timestep_subset) == (
        "rollout", pool, 4, "random", "shared")
    assert o.fm_group_noise and o.fm_sigma_range is None
    assert (o.adv_std, o.adv_std_ddof, o.adv_eps, o.adv_clip, o.drop_zero_signal) == (adv_std, 0, 1e-4, 5.0, False)
    assert (o.lr, list(o.betas), o.weight_decay, o.max_grad_norm) == (3e-4, [0.9, 0.999], 1e-4, 1.0)
    assert (o.ema_decay, o.ema_every, o.ema_warmup) == (0.9, 8, True)
    assert (m.lora.rank, m.lora.alpha, m.lora.init, m.max_sequence_length) == (64, 128, "gaussian", 128)
    assert (cfg.run.eval_steps, cfg.run.eval_guidance, cfg.run.save_every) == (14, 4.5, 60)


@pytest.mark.parametrize("name,every,stride,after,compress", [
    ("flux_dev_mixgrpo.yaml", 25, 1, "ode", 1.0), ("flux_dev_mixgrpo_flash.yaml", 20, 1, "dpm2", 0.4),
    ("flux_dev_mixgrpo_flash_star.yaml", 20, 0, "dpm2", 0.2)])
def test_mixgrpo_recipes_hold_the_official_values(name, every, stride, after, compress):
    """Tencent-Hunyuan/MixGRPO scripts/finetune/finetune_flux_grpo_MixGRPO{,_Flash,_Flash*}.sh with
    fastvideo/train_grpo_flux.py and fastvideo/utils/grpo_states.py (32 GPUs)."""
    cfg = recipe(name)
    s, o, m = cfg.sample, cfg.optim, cfg.model
    assert (s.kind, s.noise_level, s.num_steps, s.guidance, s.resolution, m.shift) == ("flow_sde", 0.7, 25, 3.5,
                                                                                        720, 3.0)
    assert (s.group_size, s.prompts_per_step, o.optimizer_steps, o.steps) == (12, 32, 4, 300)
    assert s.same_noise_per_group and s.judged_image == "final"
    # a window of 4 SDE steps from step 0, the last trained step at most 22 (max_timesteps 23)
    assert (s.window_size, list(s.window_start_range), s.window_schedule) == (4, [0, 19], "progressive")
    assert (s.window_every, s.window_stride, s.window_after, s.window_compress) == (every, stride, after, compress)
    assert o.timestep_fraction == 1.0 and o.policy_loss == "ratio"
    assert (o.lr, o.weight_decay, o.max_grad_norm, o.clip_range, o.kl_beta) == (1e-5, 1e-4, 1.0, 1e-4, 0.0)
    assert (o.adv_std, o.adv_std_ddof, o.adv_eps, o.adv_clip, o.adv_clip_after_mix) == ("group", 1, 1e-8, 5.0, True)
    assert not o.drop_zero_signal and o.ema_decay == 0.0 and not m.lora.enabled
    assert cfg.reward.mix == "advantage" and cfg.reward.weights == {"hpsv2": 1.0, "imagereward": 1.0,
                                                                    "pickscore": 1.0}

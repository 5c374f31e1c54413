"""optim.fm_sigma_range: forward-process objectives can train where composition is decided."""

import types

import pytest
import torch

from flowgrpo.algorithms.objectives.base import ForwardObjective, draw_noise
from flowgrpo.config import ConfigError
from flowgrpo.train_config import TrainConfig, validate


def test_uniform_draws_stay_in_range_and_repeat():
    gi = torch.arange(200)
    sig, eps = draw_noise(gi, (4, 8, 8), seed=3, iteration=5, tag=7, k=1, sigma_range=(0.8, 1.0))
    assert sig.min() >= 0.8 and sig.max() <= 1.0
    assert float(sig.std()) > 0.03  # spread over the range, not one value
    sig2, eps2 = draw_noise(gi, (4, 8, 8), seed=3, iteration=5, tag=7, k=1, sigma_range=(0.8, 1.0))
    assert torch.equal(sig, sig2) and torch.equal(eps, eps2)
    # the default logit-normal draw rarely lands there: that is why the option exists
    ln, _ = draw_noise(gi, (4, 8, 8), seed=3, iteration=5, tag=7, k=1)
    assert float((ln > 0.8).double().mean()) < 0.2


def test_rollout_sigmas_are_filtered_to_the_range():
    cfg = TrainConfig()
    cfg.optim.fm_timesteps, cfg.optim.timestep_fraction = "rollout", 1.0
    cfg.optim.fm_sigma_range = [0.5, 1.0]
    obj = ForwardObjective.__new__(ForwardObjective)
    obj.cfg, obj.seed = cfg, 0
    batch = types.SimpleNamespace(sigmas=torch.linspace(1.0, 0.0, 9))
    kept = [float(s) for s in obj.train_sigmas(batch, 0)]
    assert kept == [1.0, 0.875, 0.75, 0.625, 0.5]


@pytest.mark.parametrize("bad", [[0.9, 0.8], [0.5], [-0.1, 0.5], [0.5, 1.2]])
def test_bad_range_names_the_key(bad):
    cfg = TrainConfig()
    cfg.optim.fm_sigma_range = bad
    with pytest.raises(ConfigError, match="fm_sigma_range"):
        validate(cfg)


def test_every_shapes_config_validates():
    """Configs people run by name (make demo, the six-tag recipe, the one-hour run, the Fast demo) must load."""
    from pathlib import Path

    from flowgrpo.config import load_config

    root = Path(__file__).resolve().parents[1]
    names = sorted(p.name for p in (root / "configs").glob("*.yaml"))
    assert {"shapes_six.yaml", "demo.yaml", "shapes_hour.yaml", "shapes_fast.yaml"} <= set(names)
    from flowgrpo.worlds.shapes.distill import DistillConfig
    from flowgrpo.worlds.shapes.pretrain import PretrainConfig

    for name in names:
        if name.startswith("pretrain_"):  # flowgrpo pretrain's schema
            cfg = load_config(PretrainConfig, root / "configs" / name)
            assert cfg.init_from is None or (root / cfg.init_from / "transformer").is_dir()
            continue
        if name.startswith("distill_"):  # flowgrpo distill's schema
            cfg = load_config(DistillConfig, root / "configs" / name)
            assert all(0.0 <= x <= 1.0 for x in cfg.guided_interval)
            assert (root / cfg.teacher / "transformer").is_dir(), (name, cfg.teacher)
            continue
        validate(load_config(TrainConfig, root / "configs" / name))
    demo = validate(load_config(TrainConfig, root / "configs" / "demo.yaml"))
    assert demo.optim.policy_loss == "nft" and demo.optim.fm_sigma_range == [0.8, 1.0]

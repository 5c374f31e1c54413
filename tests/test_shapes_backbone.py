"""The trained shapes backbone: its corruptions, its training, and that the saved folder is
the backbone the adversarial reward loads (same features as the trained module)."""

import json

import numpy as np
import pytest
import torch

from flowgrpo.rewards import make_reward
from flowgrpo.rewards.adversarial import load_backbone
from flowgrpo.rewards.shapes import image_statistics
from flowgrpo.worlds.shapes.backbone import CORRUPTIONS, corrupt, make_batch, train_backbone
from flowgrpo.worlds.shapes.grammar import split_records
from flowgrpo.worlds.shapes.render import render


def test_each_corruption_changes_a_render_the_way_it_is_named():
    rng = np.random.default_rng(0)
    img = render(split_records()["train"][0], rng)
    stats = {k: {s: float(v[0]) for s, v in image_statistics(corrupt(img, k, rng)[None]).items()} for k in CORRUPTIONS}
    assert np.array_equal(corrupt(img, "clean", rng), img)
    for k in CORRUPTIONS[1:]:
        out = corrupt(img, k, rng)
        assert out.dtype == np.uint8 and out.shape == img.shape and not np.array_equal(out, img), k
    assert stats["blur"]["sharpness"] < stats["clean"]["sharpness"]
    assert stats["desaturate"]["saturation"] < stats["clean"]["saturation"]
    assert stats["shrink"]["size"] < stats["clean"]["size"]
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(img, "sepia", rng)


def test_batches_are_balanced_and_reproducible():
    recs = split_records()["train"]
    a, la = make_batch(recs, 32, np.random.default_rng(1))
    b, lb = make_batch(recs, 32, np.random.default_rng(1))
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert np.bincount(la, minlength=len(CORRUPTIONS)).tolist() == [4] * len(CORRUPTIONS)


def test_trained_backbone_saves_and_loads_as_the_adversarial_rewards_backbone(tmp_path):
    trained, info = train_backbone(tmp_path / "bb", steps=3, batch=16, log_every=1)
    assert len(info["log"]) == 3 and set(info["held_out_accuracy"]) == set(CORRUPTIONS)
    assert json.loads((tmp_path / "bb" / "training.json").read_text())["steps"] == 3
    loaded = load_backbone(str(tmp_path / "bb"))
    random = load_backbone("shapes")
    assert loaded.image_size == 32 and loaded.dim == random.dim
    imgs = make_batch(split_records()["test"], 8, np.random.default_rng(2))[0]
    cls, patches = loaded(imgs)
    assert not torch.allclose(cls, random(imgs)[0])  # trained: no longer the random init
    # the saved folder is the trained module: the same features, bit for bit
    mine = trained(imgs)
    assert torch.equal(cls, mine[0]) and torch.equal(patches, mine[1])
    reward = make_reward("adversarial", backbone=str(tmp_path / "bb"), references="shapes")
    recs = split_records()["test"][:8]
    out = reward(imgs, [r["prompt"] for r in recs], recs)
    assert np.isfinite(out.scores).all()

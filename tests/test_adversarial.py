"""The adversarial (Adv-GRPO) reward: backbone loading, scoring, learning, and exact resume."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flowgrpo.rewards import RewardError, make_reward
from flowgrpo.rewards.adversarial import AdversarialReward, load_backbone
from flowgrpo.worlds.shapes.grammar import split_records
from flowgrpo.worlds.shapes.render import render_batch

RECORDS = split_records()["train"]


def _batch(seed: int, n: int = 8):
    rng = np.random.default_rng(seed)
    recs = [RECORDS[i] for i in rng.integers(len(RECORDS), size=n)]
    return recs, [r["prompt"] for r in recs]


def _negatives(recs, seed):
    # Clearly unlike any reference: dark background and complementary colours.
    return 255 - render_batch(recs, seed=seed)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    """A tiny random DINOv2 saved the way a downloaded checkpoint is laid out."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(image_size=56, patch_size=14, hidden_size=48, num_hidden_layers=2,
                       num_attention_heads=2, mlp_ratio=2)
    folder = tmp_path_factory.mktemp("dinov2-tiny")
    Dinov2Model(cfg).save_pretrained(folder)
    return folder


def test_dinov2_backbone_loads_from_a_folder(dino_dir):
    from transformers import Dinov2Model

    reward = make_reward("adversarial", backbone=str(dino_dir), references="shapes", n_patches=8, device="cpu")
    assert reward.kind == "adversarial"
    assert (reward.backbone.image_size, reward.backbone.num_patches, reward.backbone.dim) == (56, 16, 48)
    assert [m.out_features for m in reward.head if hasattr(m, "out_features")] == [32, 1]  # 48 -> 32 -> 1
    assert not any(p.requires_grad for p in reward.backbone.parameters())

    # The folder's weights are used, and 32x32 inputs are resized to the checkpoint's 56 px.
    images = render_batch(RECORDS[:3], seed=0)
    cls, patches = reward.backbone(images)
    assert cls.shape == (3, 48) and patches.shape == (3, 16, 48)
    model = Dinov2Model.from_pretrained(dino_dir).eval()
    pixels = reward.backbone.pixels(images)
    assert pixels.shape == (3, 3, 56, 56)
    with torch.no_grad():
        direct = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(cls, direct[:, 0])
    torch.testing.assert_close(patches, direct[:, 1:])

    # A DINOv2-B sized backbone gets the reference's 768 -> 512 -> 1 head.
    assert make_reward("adversarial", backbone=_fake_dinov2(768), references="shapes").head[0].out_features == 512


def _fake_dinov2(hidden):
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=hidden, num_hidden_layers=1,
                                    num_attention_heads=4, mlp_ratio=1))


def test_backbone_and_argument_errors(tmp_path):
    with pytest.raises(RewardError, match="does not exist"):
        load_backbone(str(tmp_path / "nowhere"))
    with pytest.raises(RewardError, match="no config.json"):
        load_backbone(str(tmp_path))
    with pytest.raises(RewardError, match="feature_norm"):
        make_reward("adversarial", backbone="shapes", references="shapes", feature_norm="batchnorm")
    with pytest.raises(RewardError, match="bad arguments"):
        make_reward("adversarial", backbone="shapes", references="shapes", not_an_option=1)


def test_reward_shapes_formula_and_determinism():
    recs, prompts = _batch(0, n=6)
    images = render_batch(recs, seed=3)
    reward = make_reward("adversarial", backbone="shapes", references="shapes", seed=1)
    out = reward(images, prompts, recs)
    assert out.scores.shape == (6,) and out.scores.dtype == np.float64
    assert set(out.components) == {"d_cls", "d_patch"}
    np.testing.assert_allclose(out.scores, 0.7 * out.components["d_cls"] + 0.3 * out.components["d_patch"],
                               rtol=1e-6)
    # Same images, same head: same scores, whether called again, by a twin, or one image alone.
    np.testing.assert_array_equal(reward(images, prompts, recs).scores, out.scores)
    twin = make_reward("adversarial", backbone="shapes", references="shapes", seed=1)
    np.testing.assert_array_equal(twin(images, prompts, recs).scores, out.scores)
    np.testing.assert_allclose(reward(images[2:3], prompts[2:3]).scores, out.scores[2:3], rtol=1e-5, atol=1e-6)
    # Float images in [0, 1] (BCHW) score like their uint8 form.
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(reward(as_float, prompts).scores, out.scores, rtol=1e-5, atol=1e-6)
    # Weights are configurable; a different seed is a different discriminator.
    cls_only = make_reward("adversarial", backbone="shapes", references="shapes", seed=1, cls_weight=1.0,
                           patch_weight=0.0)
    np.testing.assert_allclose(cls_only(images).scores, out.components["d_cls"], rtol=1e-6)
    other = make_reward("adversarial", backbone="shapes", references="shapes", seed=2)
    assert not np.allclose(other(images).scores, out.scores)


def test_head_learns_to_separate_references_from_different_images():
    reward = make_reward("adversarial", backbone="shapes", references="shapes", n_patches=16)
    losses = []
    for step in range(30):
        recs, prompts = _batch(step, n=16)
        metrics = reward.update(_negatives(recs, seed=1000 + step), prompts, recs)
        losses.append(metrics["d_loss"])
    assert set(metrics) >= {"d_loss", "acc_ref", "acc_gen", "reward_ref", "reward_gen"}
    assert metrics["acc_ref"] == 1.0 and metrics["acc_gen"] == 1.0
    assert metrics["reward_ref"] > 0 > metrics["reward_gen"]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    # Held-out scenes: every reference outscores every negative.
    recs, prompts = _batch(999, n=24)
    ref_scores = reward(render_batch(recs, seed=7), prompts, recs).scores
    gen_scores = reward(_negatives(recs, seed=8), prompts, recs).scores
    assert ref_scores.min() > gen_scores.max()


def _run_updates(reward, steps):
    out = []
    for step in steps:
        recs, prompts = _batch(step)
        out.append(reward.update(_negatives(recs, seed=step), prompts, recs))
    return out


def test_state_dict_round_trip_through_safetensors_resumes_exactly(tmp_path):
    def build():
        return make_reward("adversarial", backbone="shapes", references="shapes", lr=1e-3, n_patches=16)

    straight = build()
    metrics_straight = _run_updates(straight, [0, 1])

    first = build()
    _run_updates(first, [0])
    save_file(first.state_dict(), tmp_path / "disc.safetensors")
    resumed = build()
    resumed.load_state_dict(load_file(tmp_path / "disc.safetensors"))
    metrics_resumed = _run_updates(resumed, [1])

    assert metrics_resumed[0] == metrics_straight[1]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert {"optim.0.exp_avg", "optim.0.exp_avg_sq", "optim.0.step", "sampler.state"} <= a.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    recs, prompts = _batch(50)
    images = render_batch(recs, seed=50)
    np.testing.assert_array_equal(straight(images).scores, resumed(images).scores)

    # Without the restore the second step differs: the comparison above can fail.
    fresh = build()
    assert _run_updates(fresh, [1])[0] != metrics_straight[1]


def test_resume_onto_another_backbone_is_refused(dino_dir):
    shapes = make_reward("adversarial", backbone="shapes", references="shapes")
    _run_updates(shapes, [0])
    other = make_reward("adversarial", backbone="shapes", references="shapes", seed=5)
    with pytest.raises(RewardError, match="another backbone"):
        other.load_state_dict(shapes.state_dict())
    # The same weights in bfloat16 (as on a GPU) are the same backbone.
    from flowgrpo.rewards.adversarial import shapes_backbone

    half = shapes_backbone(0)
    half.model.to(torch.bfloat16)
    make_reward("adversarial", backbone=half, references="shapes").load_state_dict(shapes.state_dict())
    dino = make_reward("adversarial", backbone=str(dino_dir), references="shapes", device="cpu")
    state = {k: v for k, v in shapes.state_dict().items() if k != "backbone.fingerprint"}
    with pytest.raises(RewardError, match="does not fit"):
        dino.load_state_dict(state)


def _write_reference_json(folder, prompt_records, size=48):
    """A reference set on disk whose images are larger than the generated ones."""
    mapping = {}
    for i, rec in enumerate(prompt_records):
        files = []
        for j, img in enumerate(render_batch([rec] * 2, seed=i, size=size)):
            name = f"img/{i}_{j}.png"
            (folder / "img").mkdir(exist_ok=True)
            Image.fromarray(img).save(folder / name)
            files.append(name)
        mapping[rec["prompt"]] = files
    (folder / "refs.json").write_text(json.dumps(mapping))
    return folder / "refs.json"


def test_update_with_a_reference_json_and_the_skip_policy(tmp_path):
    recs = RECORDS[:3]
    path = _write_reference_json(tmp_path, recs[:2])
    prompts = [r["prompt"] for r in recs]
    negatives = _negatives(recs, seed=0)

    strict = make_reward("adversarial", backbone="shapes", references=str(path))
    assert strict.update(negatives[:2], prompts[:2])["d_skipped"] == 0
    with pytest.raises(RewardError, match="has no references"):
        strict.update(negatives, prompts)

    lenient = make_reward("adversarial", backbone="shapes", references=str(path), on_missing="skip")
    metrics = lenient.update(negatives, prompts)
    assert metrics["d_skipped"] == 1 and np.isfinite(metrics["d_loss"])
    assert lenient.n_updates == 1
    assert lenient.update(negatives[2:], prompts[2:]) == {"d_skipped": 1.0}  # nothing to learn from
    assert lenient.n_updates == 1


def test_reward_is_registered_for_the_registry():
    from flowgrpo.rewards import available_rewards

    assert "adversarial" in available_rewards()
    assert isinstance(make_reward("adversarial", backbone="shapes", references="shapes"), AdversarialReward)

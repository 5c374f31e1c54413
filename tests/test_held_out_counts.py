"""Held-out evaluation with each prompt's own image count (run.eval_images_per_tag): the counts
per tag, the images (a prompt's first images are the same at any count), and the trainer's table."""

import numpy as np
import pytest
import torch

from flowgrpo.config import ConfigError, load_config
from flowgrpo.eval.held_out import evaluate_held_out, evaluation_units, images_per_tag
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.worlds.shapes.grammar import split_records


def _items(tags=("colors", "two_object", "position")):
    recs = [r for r in split_records()["test"] if r["tag"] in tags]
    return [{"prompt": r["prompt"], "metadata": r} for r in recs]


def test_images_per_tag_spreads_each_tags_images_over_its_prompts():
    items = _items(("color_attr", "two_object", "colors"))
    counts = images_per_tag(items, 96)
    by_tag = {}
    for it, c in zip(items, counts):
        by_tag.setdefault(it["metadata"]["tag"], []).append(c)
    # shapes test split: color_attr 34 prompts, colors 4, two_object 2
    assert by_tag["color_attr"] == [3] * 34 and by_tag["colors"] == [24] * 4 and by_tag["two_object"] == [48] * 2
    assert all(96 <= sum(v) < 96 + len(v) for v in by_tag.values())


def test_units_pack_consecutive_prompts_and_match_the_uniform_split():
    assert evaluation_units(5, [3, 3, 10, 2, 2], 6) == [[0, 1], [2], [3, 4]]
    assert evaluation_units(7, 4, 8) == [[0, 1], [2, 3], [4, 5], [6]]  # one count: batch // count a unit


@pytest.fixture(scope="module")
def tiny_policy(tiny_shapes_model):
    from flowgrpo.models import load_policy

    torch.set_num_threads(1)
    return load_policy(str(tiny_shapes_model))


def test_a_prompts_first_images_are_the_same_at_any_count(tiny_policy):
    items = _items()[:3]
    kw = dict(steps=3, guidance=1.0, resolution=16, seed=5, batch_size=8, keep_images=True)
    uniform = evaluate_held_out(tiny_policy, items, images_per_prompt=2, **kw)
    counts = [2, 5, 3]
    varied = evaluate_held_out(tiny_policy, items, images_per_prompt=counts, **kw)
    assert varied.table["n_images"] == sum(counts) == len(varied.images)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i in range(3):
        first_two = varied.images[starts[i]:starts[i] + 2].astype(int)
        # the same seeds, drawn in other batches: equal up to a rounding step of the uint8 images
        assert np.abs(first_two - uniform.images[2 * i:2 * i + 2].astype(int)).max() <= 1
    with pytest.raises(ValueError, match="one per prompt"):
        evaluate_held_out(tiny_policy, items, images_per_prompt=[2, 2], **kw)


def test_trainer_evaluates_with_images_per_tag(tiny_shapes_model, tmp_path):
    from flowgrpo.trainer import Trainer, evaluate

    from helpers import tiny_overrides

    over = tiny_overrides(tiny_shapes_model, tmp_path) + [
        "data.test=shapes:test", "data.test_tags=[colors,two_object]", "run.eval_images_per_tag=8",
        "run.eval_steps=2", "run.threads=1"]
    trainer = Trainer(validate(load_config(TrainConfig, None, over)))
    table = evaluate(trainer, "before")
    # colors: 4 prompts x 2, two_object: 2 prompts x 4 (unseen colour bindings get their own row)
    assert table["n_images"] == 16 and {"colors", "two_object"} <= set(table["per_tag"])
    assert (tmp_path / "grids" / "eval-before.png").exists()
    with pytest.raises(ConfigError, match="eval_images_per_tag"):
        validate(load_config(TrainConfig, None, ["run.eval_images_per_tag=-1"]))

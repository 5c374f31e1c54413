"""The RL-ready base: guidance distillation with alt-text caption noise (worlds/shapes/distill.py)."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowgrpo.config import load_config
from flowgrpo.eval.shapes import UNSEEN, accuracy_table, format_table, paired_difference_ci
from flowgrpo.worlds.shapes.distill import DistillConfig, corrupt_record, distill
from flowgrpo.worlds.shapes.grammar import HELD_OUT_BINDINGS, bindings, parse_prompt, split_records
from flowgrpo.worlds.shapes.render import render


def test_corruption_rates_and_no_held_out_binding():
    rng = np.random.default_rng(0)
    train = split_records()["train"]
    colors = [r for r in train if r["tag"] == "colors"]
    counting = [r for r in train if r["tag"] == "counting"]
    flipped_color = [corrupt_record(r, rng, 0.5, 0.0)["prompt"] != r["prompt"] for r in colors * 250]
    flipped_count = [corrupt_record(r, rng, 0.0, 0.4)["prompt"] != r["prompt"] for r in counting * 250]
    assert np.mean(flipped_color) == pytest.approx(0.5, abs=0.03)
    assert np.mean(flipped_count) == pytest.approx(0.4, abs=0.03)
    for r in train * 20:
        c = corrupt_record(r, rng, 0.9, 0.9)
        assert not bindings(c) & set(HELD_OUT_BINDINGS), c["prompt"]
        assert parse_prompt(c["prompt"]) == {k: v for k, v in c.items()}  # still a grammar record
        assert [x["class"] for x in c["include"]] == [x["class"] for x in r["include"]]  # only attributes change
    untouched = [r for r in train if r["tag"] in ("single_object", "two_object", "position")]
    assert all(corrupt_record(r, rng, 1.0, 1.0) == r for r in untouched)


def test_unseen_bindings_are_reported_outside_the_overall():
    records = [r for r in split_records()["test"] if r["tag"] == "colors"]
    unseen = [r for r in records if bindings(r) & set(HELD_OUT_BINDINGS)]
    assert unseen and len(unseen) < len(records)
    images = np.stack([render(r, i) for i, r in enumerate(records)])
    blank = np.full_like(images, 255)
    # renders of the seen prompts, blanks for the unseen ones: the overall must not move
    mixed = np.stack([blank[i] if r in unseen else images[i] for i, r in enumerate(records)])
    table = accuracy_table(mixed, records)
    assert table["per_tag"] == {"colors": 1.0, UNSEEN: 0.0} and table["overall"] == 1.0
    assert table["recognised_objects"] == 1.0
    before = accuracy_table(blank, records)
    d, lo, hi = paired_difference_ci(before["strict"], table["strict"], table["tags"])
    assert d == 1.0 and "outside the overall" in format_table({"a": before, "b": table})


def _tiny_distill(tiny_shapes_model, work, stop_after, out):
    overrides = [f"teacher={tiny_shapes_model}", f"work_dir={work}", f"out={out}", "steps=4", "batch=8",
                 f"stop_after={stop_after}",
                 "checkpoint_every=2", "log_every=1", "threads=1", "warmup=1", "lr=1e-3"]
    return load_config(DistillConfig, None, overrides)


def test_distillation_regresses_on_the_guided_teacher_and_resumes_exactly(tiny_shapes_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = distill(_tiny_distill(tiny_shapes_model, tmp_path / "a", 4, tmp_path / "model_a"))
    log = (tmp_path / "a" / "log.txt").read_text()
    losses = [float(x) for x in __import__("re").findall(r"loss ([0-9.]+)", log)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # interrupted after 2 steps, then resumed to 4: identical weights
    distill(_tiny_distill(tiny_shapes_model, tmp_path / "b", 2, tmp_path / "model_b"))
    distill(_tiny_distill(tiny_shapes_model, tmp_path / "b", 4, tmp_path / "model_b"))
    a = load_file(tmp_path / "a" / "checkpoint" / "ema.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed at step 2" in (tmp_path / "b" / "log.txt").read_text()
    # a plain diffusers folder; CFG-free is its default because the guidance is baked in
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert json.loads((out / "flowgrpo_defaults.json").read_text())["guidance"] == 1.0
    recorded = json.loads((out / "distillation.json").read_text())
    assert recorded["color_noise"] == 0.5 and recorded["render_centred_relations"] is False
    teacher = StableDiffusion3Pipeline.from_pretrained(tiny_shapes_model, text_encoder_3=None, tokenizer_3=None)
    moved = [not torch.equal(p, q) for p, q in zip(pipe.transformer.parameters(), teacher.transformer.parameters())]
    assert any(moved)
    assert all(torch.equal(p, q) for p, q in zip(pipe.text_encoder.parameters(), teacher.text_encoder.parameters()))


def test_missing_teacher_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher="):
        distill(load_config(DistillConfig, None, [f"teacher={tmp_path / 'nope'}", f"work_dir={tmp_path / 'w'}"]))


def test_guided_interval_takes_the_scene_flow_outside_it():
    from flowgrpo.worlds.shapes.distill import distillation_target

    g = torch.Generator().manual_seed(0)
    v_u, v_c, flow = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    w = torch.full((4, 1, 1, 1), 4.5)
    t = torch.tensor([0.05, 0.5, 0.8, 0.95])
    out = distillation_target(v_u, v_c, w, flow, t, (0.2, 0.8))
    guided = v_u + 4.5 * (v_c - v_u)
    assert torch.equal(out[1:3], guided[1:3])  # inside, both ends included
    assert torch.equal(out[0], flow[0]) and torch.equal(out[3], flow[3])
    assert torch.equal(distillation_target(v_u, v_c, w, flow, t, (0.0, 1.0)), guided)  # plain distillation


def test_refinement_starts_from_student_init_and_checks_its_interval(tiny_shapes_model, tmp_path):
    from diffusers import SD3Transformer2DModel

    # a refinement with a zero learning rate writes its init unchanged, not the teacher
    init = tmp_path / "init"
    shutil.copytree(tiny_shapes_model, init)
    moved = SD3Transformer2DModel.from_pretrained(init / "transformer")
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.01)
    moved.save_pretrained(init / "transformer")
    cfg = load_config(DistillConfig, None, [f"teacher={tiny_shapes_model}", f"student_init={init}",
                                            f"work_dir={tmp_path / 'w'}", f"out={tmp_path / 'out'}", "steps=1",
                                            "batch=4", "lr=0.0", "threads=1", "guided_interval=[0.0,0.8]"])
    out = distill(cfg)
    written = SD3Transformer2DModel.from_pretrained(out / "transformer")
    assert all(torch.equal(p, q) for p, q in zip(written.parameters(), moved.parameters()))
    assert json.loads((out / "distillation.json").read_text())["guided_interval"] == [0.0, 0.8]
    bad = load_config(DistillConfig, None, [f"teacher={tiny_shapes_model}", f"work_dir={tmp_path / 'v'}",
                                            "guided_interval=[0.9,0.1]"])
    with pytest.raises(ValueError, match="guided_interval"):
        distill(bad)
    with pytest.raises(ValueError, match="t_range"):
        distill(load_config(DistillConfig, None, [f"teacher={tiny_shapes_model}", f"work_dir={tmp_path / 'u'}",
                                                  "t_range=[0.5,0.5]"]))
    with pytest.raises(FileNotFoundError, match="student_init"):
        distill(load_config(DistillConfig, None, [f"teacher={tiny_shapes_model}", f"work_dir={tmp_path / 'x'}",
                                                  f"student_init={tmp_path / 'nope'}"]))

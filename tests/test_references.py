"""Reference sets: validation, the skip policy, and `flowgrpo make-references` (shapes and diffusers)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowgrpo.cli import main
from flowgrpo.rewards import RewardError
from flowgrpo.rewards.references import (ReferenceSet, ShapesReferences, load_references, prompt_folder,
                                         read_prompts)
from flowgrpo.worlds.shapes.grammar import parse_prompt, split_records
from flowgrpo.worlds.shapes.verify import score

PROMPTS = ["a photo of a red circle", "a photo of two squares", "a photo of a triangle left of a circle"]


def _png(path, value=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def _json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_loader_resolves_relative_paths_and_draws_with_the_generator(tmp_path):
    _png(tmp_path / "a" / "0.png", 10)
    _png(tmp_path / "a" / "1.png", 20)
    absolute = tmp_path / "elsewhere" / "b.png"
    _png(absolute, 30)
    _json(tmp_path / "references.json", {"p1": ["a/0.png", "a/1.png"], "p2": [str(absolute)]})
    refs = load_references(str(tmp_path))  # a folder means its references.json
    assert len(refs) == 2 and "p1" in refs
    draws = refs.sample(["p1"] * 40 + ["p2"], [None] * 41, torch.Generator().manual_seed(0))
    assert {int(d[0, 0, 0]) for d in draws[:40]} == {10, 20}  # both references of p1 get drawn
    assert draws[40].shape == (8, 8, 3) and draws[40][0, 0, 0] == 30
    again = refs.sample(["p1"] * 40, [None] * 40, torch.Generator().manual_seed(0))
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "must be a JSON object"),
    ('{"p": 3}', "must be a list of image file paths"),
    ("{not json", "not valid JSON"),
    ("{}", "no usable reference images"),
])
def test_malformed_reference_files_are_explained(tmp_path, content, message):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(RewardError, match=message):
        ReferenceSet.load(tmp_path / "r.json")


def test_missing_files_and_empty_prompts_error_or_skip(tmp_path):
    _png(tmp_path / "ok.png")
    path = _json(tmp_path / "r.json", {"good": ["ok.png", "gone.png"], "empty": [], "lost": ["gone2.png"]})
    with pytest.raises(RewardError, match=r"2 image file\(s\) missing.*gone\.png.*make-references"):
        ReferenceSet.load(path)
    _json(tmp_path / "r2.json", {"good": ["ok.png"], "empty": []})
    with pytest.raises(RewardError, match="prompt 'empty' has no reference images"):
        ReferenceSet.load(tmp_path / "r2.json")
    with pytest.raises(RewardError, match="does not exist"):
        ReferenceSet.load(tmp_path / "nope.json")
    with pytest.raises(RewardError, match="on_missing"):
        ReferenceSet.load(path, on_missing="ignore")

    skipping = ReferenceSet.load(path, on_missing="skip")
    assert list(skipping.mapping) == ["good"] and len(skipping.mapping["good"]) == 1
    assert (skipping.skipped_files, skipping.skipped_prompts) == (2, 2)
    draws = skipping.sample(["good", "unknown"], [None, None], torch.Generator().manual_seed(0))
    assert draws[0] is not None and draws[1] is None

    strict = ReferenceSet.load(_json(tmp_path / "r3.json", {"good": ["ok.png"]}))
    with pytest.raises(RewardError, match="'unknown' has no references"):
        strict.sample(["unknown"], [None], torch.Generator())


def test_shapes_references_satisfy_their_prompts():
    refs = ShapesReferences()
    records = split_records()["train"][::25]
    gen = torch.Generator().manual_seed(0)
    images = refs.sample([r["prompt"] for r in records], records, gen)
    assert all(score(img, rec).strict == 1 for img, rec in zip(images, records))
    # Without metadata the prompt is parsed; every draw is a new scene.
    a, b = refs.sample([PROMPTS[0]] * 2, [None, None], gen)
    assert score(a, parse_prompt(PROMPTS[0])).strict == 1 and not np.array_equal(a, b)
    with pytest.raises(RewardError, match="outside the shapes grammar"):
        refs.sample(["a photo of a dog"], [None], gen)


def test_read_prompts_dedups_and_explains(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb\na\n")
    assert read_prompts(tmp_path / "p.txt") == [("a", None), ("b", None)]
    rec = {"prompt": "x", "tag": "t", "include": []}
    (tmp_path / "p.jsonl").write_text(json.dumps(rec) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == [("x", rec)]
    shapes = read_prompts("shapes:train")
    assert len(shapes) == len(split_records()["train"]) and "include" in shapes[0][1]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(RewardError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")


def _make(argv):
    return main(["make-references", *map(str, argv)])


def test_make_references_from_the_shapes_renderer_resumes(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "refs"
    assert _make(["--prompts", tmp_path / "prompts.txt", "--out", out, "--shapes", "--n", 3, "--seed", 4]) == 0
    refs = ReferenceSet.load(out / "references.json")
    assert sorted(refs.mapping) == sorted(PROMPTS)
    for prompt in PROMPTS:
        files = refs.mapping[prompt]
        assert [f.name for f in files] == ["0.png", "1.png", "2.png"]
        assert files[0].parent.name == prompt_folder(prompt)
        for f in files:
            img = np.asarray(Image.open(f))
            assert img.shape == (32, 32, 3) and score(img, parse_prompt(prompt)).strict == 1
    raw = json.loads((out / "references.json").read_text())
    assert raw[PROMPTS[0]][0].startswith("images/")  # relative, so the folder can move

    # Resume: an existing file is kept as it is, a deleted one comes back identical.
    first = refs.mapping[PROMPTS[0]]
    original = first[1].read_bytes()
    first[1].unlink()
    _png(first[0], 0, size=32)
    marker = first[0].read_bytes()
    capsys.readouterr()
    assert _make(["--prompts", tmp_path / "prompts.txt", "--out", out, "--shapes", "--n", 3, "--seed", 4]) == 0
    assert "1 made, 8 already there" in capsys.readouterr().err
    assert first[1].read_bytes() == original and first[0].read_bytes() == marker
    assert not list(out.rglob("*.tmp"))

    # A larger --n extends the set; images 0-2 are reused.
    assert _make(["--prompts", tmp_path / "prompts.txt", "--out", out, "--shapes", "--n", 4, "--seed", 4]) == 0
    assert "3 made, 9 already there" in capsys.readouterr().err
    assert len(ReferenceSet.load(out).mapping[PROMPTS[1]]) == 4


def test_make_references_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a photo of a dog\n")
    assert _make(["--prompts", tmp_path / "p.txt", "--out", tmp_path / "o", "--shapes"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowgrpo make-references: error:") and "outside the shapes grammar" in err
    assert len(err.splitlines()) == 1
    assert _make(["--prompts", tmp_path / "missing.txt", "--out", tmp_path / "o", "--shapes"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _make(["--prompts", tmp_path / "p.txt", "--out", tmp_path / "o", "--model", tmp_path / "none",
                  "--pipeline-kwargs", "{oops"]) == 2
    assert "--pipeline-kwargs is not valid JSON" in capsys.readouterr().err
    assert _make(["--prompts", tmp_path / "p.txt", "--out", tmp_path / "o", "--model", tmp_path / "none"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _make(["--prompts", tmp_path / "p.txt", "--out", tmp_path / "o", "--shapes", "--steps", 3]) == 2
    assert "apply to --model only" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A randomly initialised text-to-image diffusers pipeline (a tiny SD3) saved to disk."""
    from flowgrpo.worlds.shapes.model import ShapesArchitecture, build_pipeline, save_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd3")
    arch = ShapesArchitecture(vae_channels=8, num_layers=1, num_heads=2, head_dim=8, text_hidden=16,
                              text_layers=1, text_projection=8)
    return save_pipeline(build_pipeline(arch, folder / "word-tokenizer"), folder / "pipe")


def test_model_defaults_become_call_arguments():
    from flowgrpo.rewards.references import _PipelineSource

    accepted = {"max_sequence_length", "num_inference_steps", "guidance_scale", "height", "width"}
    defaults = {"max_sequence_length": 1, "resolution": 32, "guidance": 4.5, "eval_guidance": 3.0, "eval_steps": 20}
    assert _PipelineSource._model_defaults(defaults, accepted) == {
        "max_sequence_length": 1, "num_inference_steps": 20, "guidance_scale": 3.0, "height": 32, "width": 32}
    assert _PipelineSource._model_defaults(defaults, {"height"}) == {"height": 32}


def test_make_references_from_a_diffusers_pipeline(tiny_pipeline, tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    out = tmp_path / "refs"
    argv = ["--prompts", tmp_path / "prompts.jsonl", "--out", out, "--model", tiny_pipeline, "--n", 3,
            "--steps", 2, "--guidance", 2.0, "--seed", 1, "--device", "cpu",
            "--pipeline-kwargs", '{"max_sequence_length": 1}']
    assert _make(argv) == 0
    refs = ReferenceSet.load(out)
    assert sorted(refs.mapping) == sorted(PROMPTS[:2])
    images = [np.asarray(Image.open(f)) for f in refs.mapping[PROMPTS[0]]]
    assert all(im.shape == (32, 32, 3) for im in images)
    assert not np.array_equal(images[0], images[1])  # one seed per image, not one per prompt

    # Resume regenerates only what is missing, and per-image seeds make it the same image
    # (up to float noise from the different batch size).
    target = refs.mapping[PROMPTS[0]][1]
    target.unlink()
    capsys.readouterr()
    assert _make(argv) == 0
    assert "1 made, 5 already there" in capsys.readouterr().err
    again = np.asarray(Image.open(target)).astype(int)
    assert np.abs(again - images[1].astype(int)).max() <= 2

    # Arguments the pipeline does not take are refused before any image is made.
    bad = argv[:-1] + ['{"no_such_argument": 1}']
    assert _make(bad + ["--out", tmp_path / "other"]) == 2
    assert "does not take ['no_such_argument']" in capsys.readouterr().err

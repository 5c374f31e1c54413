import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline

from helpers import tiny_arch
from flowgrpo.config import load_config
from flowgrpo.models import load_policy
from flowgrpo.worlds.shapes.grammar import vocabulary
from flowgrpo.worlds.shapes.model import write_word_tokenizer
from flowgrpo.worlds.shapes.pretrain import PretrainConfig, encode_text, pretrain

ROOT = Path(__file__).resolve().parents[1]


def test_word_level_tokenizer(tmp_path):
    tok = write_word_tokenizer(tmp_path, 16)
    for w in vocabulary():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1
    ids = tok("a photo of three red triangles").input_ids
    assert len(ids) == 6 + 2  # one token a word plus BOS/EOS


def _load(folder):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe):
    return pipe(["a photo of a red circle", "a photo of two squares"], num_inference_steps=4, guidance_scale=3.0,
                height=16, width=16, max_sequence_length=1, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_folder_round_trip_gives_identical_samples(tiny_shapes_model, tmp_path):
    pipe = _load(tiny_shapes_model)
    pipe.save_pretrained(tmp_path / "again")
    again = _load(tmp_path / "again")
    assert np.array_equal(_sample(pipe), _sample(again))


def test_training_encoder_and_policy_match_the_diffusers_pipeline(tiny_shapes_model):
    pipe = _load(tiny_shapes_model)
    prompts = ["a photo of a red circle", ""]
    emb, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                           max_sequence_length=1)
    with torch.no_grad():
        mine, mine_pooled = encode_text([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                        prompts, 1, pipe.transformer.config.joint_attention_dim)
    assert torch.allclose(emb, mine) and torch.allclose(pooled, mine_pooled)
    # flowgrpo's ODE rollout (what evaluation uses) reproduces the pipeline's images
    from flowgrpo.eval.shapes import sample_images

    policy = load_policy(str(tiny_shapes_model))
    shape = policy.latent_shape(16, 16)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn((1, *shape), generator=g)
    ref = pipe("a photo of a circle", num_inference_steps=4, guidance_scale=3.0, height=16, width=16,
               max_sequence_length=1, output_type="np", latents=latents).images
    ours = sample_images(policy, ["a photo of a circle"], [5], steps=4, guidance=3.0, resolution=16)
    assert np.abs(ours[0].astype(int) - np.round(ref[0] * 255).astype(int)).max() <= 1


def test_pretraining_loss_falls_and_writes_a_pipeline(tmp_path):
    from dataclasses import asdict

    arch = asdict(tiny_arch())
    overrides = [f"out={tmp_path / 'model'}", f"work_dir={tmp_path / 'work'}", "vae_steps=20", "vae_batch=8",
                 "dit_steps=60", "dit_batch=16", "dit_lr=2e-3", "dit_warmup=5", "checkpoint_every=30",
                 "eval_every=0", "log_every=10", "threads=1"] + [f"arch.{k}={v}" for k, v in arch.items()]
    cfg = load_config(PretrainConfig, None, overrides)
    out = pretrain(cfg)
    losses = [float(x) for x in re.findall(r"dit step \d+ loss ([0-9.]+)", (tmp_path / "work" / "log.txt").read_text())]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    pipe = _load(out)
    assert _sample(pipe).shape == (2, 16, 16, 3)
    assert (Path(out) / "flowgrpo_defaults.json").is_file()


def test_continuation_on_cell_layouts_keeps_the_text_encoders(tiny_shapes_model, tmp_path):
    """The cell-layout teacher recipe (configs/pretrain_shapes_cells.yaml): continue a folder on wide-gap cell layouts, text encoders frozen."""
    from dataclasses import asdict

    from safetensors.torch import load_file

    arch = asdict(tiny_arch())
    overrides = [f"out={tmp_path / 'model'}", f"work_dir={tmp_path / 'work'}", f"init_from={tiny_shapes_model}",
                 "dit_steps=4", "dit_batch=8", "dit_warmup=1", "checkpoint_every=4", "eval_every=0", "threads=1",
                 "render_cells=true", "render_gap=4", "render_centred_relations=true", "train_text_encoders=false",
                 "tag_weights={position: 3.0}", "t_logit_mean=1.0"] + [f"arch.{k}={v}" for k, v in arch.items()]
    out = Path(pretrain(load_config(PretrainConfig, None, overrides)))
    for part in ("text_encoder", "text_encoder_2", "vae", "transformer"):
        ours = load_file(next((out / part).glob("*.safetensors")))
        theirs = load_file(next((Path(tiny_shapes_model) / part).glob("*.safetensors")))
        same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert same == (part != "transformer"), part


def test_pretraining_tag_weights_set_the_share_of_scenes():
    import collections

    import pytest

    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.pretrain import _tag_balanced_prompts

    train = split_records()["train"]
    drawn = _tag_balanced_prompts(np.random.default_rng(0), 7000, train, {"position": 3.0, "colors": 0.0})
    share = {t: c / 7000 for t, c in collections.Counter(r["tag"] for r in drawn).items()}
    assert "colors" not in share and abs(share["position"] - 3 / 7) < 0.02
    assert all(abs(share[t] - 1 / 7) < 0.015 for t in ("counting", "single_object", "two_object", "color_attr"))
    # without weights the draw is the uniform one the shipped folders were made with, draw for draw
    rng, ref = np.random.default_rng(1), np.random.default_rng(1)
    by_tag = {t: [r for r in train if r["tag"] == t] for t in sorted({r["tag"] for r in train})}
    tags = sorted(by_tag)
    expected = [by_tag[tags[i]][ref.integers(len(by_tag[tags[i]]))] for i in ref.integers(len(tags), size=50)]
    assert _tag_balanced_prompts(rng, 50, train, {}) == expected
    with pytest.raises(ValueError, match="unknown: \\['colour'\\]"):
        _tag_balanced_prompts(rng, 1, train, {"colour": 2.0})
    with pytest.raises(ValueError, match=">= 0"):
        _tag_balanced_prompts(rng, 1, train, {"position": -1.0})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flowgrpo", *args], capture_output=True, text=True, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    res = _cli("eval", "shapes", "--model", str(tmp_path / "missing"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = _cli("sample", "--model", str(ROOT / "assets" / "shapes-sd3"), "--prompts", str(tmp_path / "nope.txt"))
    assert res.returncode == 2 and "nope.txt" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a photo of a dog"}\n')
    res = _cli("eval", "shapes", "--model", str(ROOT / "assets" / "shapes-sd3"), "--prompts", str(bad))
    assert res.returncode == 2 and "outside the shapes grammar" in res.stderr and "Traceback" not in res.stderr
    res = _cli("train", str(ROOT / "configs" / "demo.yaml"), "optim.lrr=1")
    assert res.returncode == 2 and "optim.lrr" in res.stderr and "Traceback" not in res.stderr


def test_eval_shapes_tag_filter(tmp_path):
    model = str(ROOT / "assets" / "shapes-sd3")
    res = _cli("eval", "shapes", "--model", model, "--tags", "colour", "--n", "1")
    assert res.returncode == 2 and "have tags ['colour']" in res.stderr and "Traceback" not in res.stderr
    out = tmp_path / "table.json"
    res = _cli("eval", "shapes", "--model", model, "--prompts", "shapes:train", "--tags", "single_object",
               "--n", "1", "--steps", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr
    table = json.loads(out.read_text())
    assert set(table["per_tag"]) == {"single_object"} and table["n_images"] == 3


SHIPPED_FOLDERS = sorted(p.name for p in (ROOT / "assets").glob("shapes-sd3*"))


def test_shipped_bases_are_diffusers_folders_sharing_the_teachers_encoders():
    """Every shipped shapes base loads in plain diffusers and samples; the distilled and refined
    ones change only the transformer (the text encoders, VAE and tokenizers are the teacher's)."""
    from safetensors.torch import load_file

    assert {"shapes-sd3", "shapes-sd3-alt"} <= set(SHIPPED_FOLDERS)
    teacher = ROOT / "assets" / "shapes-sd3"
    for name in SHIPPED_FOLDERS:
        folder = ROOT / "assets" / name
        pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)  # no T5
        image = pipe("a photo of a red circle", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                     max_sequence_length=1, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
        assert image.shape == (32, 32, 3) and np.isfinite(image).all()
        for part in ("text_encoder", "text_encoder_2", "vae"):
            ours = load_file(next((folder / part).glob("*.safetensors")))
            theirs = load_file(next((teacher / part).glob("*.safetensors")))
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), (name, part)

"""What several test files share. Test modules import from here, never from each other.

    helpers            paths, the tiny shapes model, training configs for it, checkpoints,
                       UniGenBench prompt rows of our own
    helpers.servers    loopback HTTP servers: any ASGI app, a scripted chat-completions server
    helpers.pipelines  tiny random SD3 and FLUX.1 pipelines of the real diffusers classes
    helpers.qwen_flux2 tiny random Qwen-Image and FLUX.2 pipelines and what their tests share
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]  # the checkout
SHARED_DATA = ROOT.parent / "shared" / "data"  # benchmark prompt files beside the checkout (CI has them)


def load_script(name: str):
    """scripts/NAME.py as a module, registered in sys.modules (its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- tiny models and training configs --------------------------------------------------------
def tiny_arch():
    """A shapes-architecture SD3 small enough to build and run in a fraction of a second."""
    from flowgrpo.worlds.shapes.model import ShapesArchitecture

    return ShapesArchitecture(image_size=16, vae_channels=8, patch_size=4, num_layers=1, num_heads=2, head_dim=8,
                              text_hidden=16, text_layers=2, text_projection=8)


def build_tiny_shapes_model(root: Path, arch=None) -> Path:
    """A randomly initialised (seed 0) shapes-architecture model (`arch`, default tiny_arch())
    saved as a diffusers folder under root."""
    from flowgrpo.worlds.shapes.model import build_pipeline, save_pipeline

    pipe = build_pipeline(arch or tiny_arch(), root / "tok", seed=0)
    return save_pipeline(pipe, root / "model", {"max_sequence_length": 1, "resolution": 16, "guidance": 2.0})


def tiny_overrides(model: Path, out: Path, steps: int = 2) -> list[str]:
    """Training overrides for the tiny model: 2 prompts x 4 images, 4 sampler steps, LoRA rank 4."""
    return [f"model.path={model}", "model.lora.rank=4", "model.lora.alpha=8", "sample.num_steps=4",
            "sample.group_size=4", "sample.prompts_per_step=2", "sample.batch_size=8", "sample.guidance=2.0",
            "optim.train_batch_size=8", f"optim.steps={steps}", "optim.lr=0.01", "optim.clip_range=0.2",
            "optim.kl_beta=0.04", "run.eval_before=false", "run.tensorboard=false", "data.test=",
            f"run.output_dir={out}", "reward.weights={jpeg_compressibility: 1.0, shapes_partial: 0.5}"]


def make_cfg(model, out, steps=2, extra=()):
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig, validate

    return validate(load_config(TrainConfig, None, tiny_overrides(model, out, steps) + list(extra)))


def assert_same_checkpoint(run_a: Path, run_b: Path, step: int, name: str = "trainable.safetensors") -> None:
    """The file `name` of both runs' checkpoint at `step` holds the same tensors, bit for bit."""
    a = load_file(run_a / "checkpoints" / f"ckpt-{step:06d}" / name)
    b = load_file(run_b / "checkpoints" / f"ckpt-{step:06d}" / name)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def trained_policy(model: Path, run: Path, rank: int, alpha: int, targets=(), init="gaussian"):
    """The policy exactly as the trainer held it at the end of `run` (its final checkpoint)."""
    from flowgrpo.models import load_policy
    from flowgrpo.models.sd3 import LoraSpec

    policy = load_policy(str(model))
    policy.add_lora(LoraSpec(rank, alpha, init, list(targets)))
    ckpt = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
    tensors = load_file(ckpt / "trainable.safetensors")
    params = {n: p for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert params.keys() == tensors.keys()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    return policy


# ---- UniGenBench prompt rows written for the tests ----------------------------------------------
# (key, prompt, testpoints, descriptions): the layout of UniGenBench's test_prompts_en.csv with
# sentences of our own, so scoring and resume tests run without the published file.
SYNTHETIC_UNIGENBENCH_ROWS = [
    ("0", "In the style of a woodcut print, beside the Eiffel Tower, three foxes share a picnic.",
     ["Style", "World Knowledge", "Attribute - Quantity"], ["woodcut print", "Eiffel Tower", "three foxes"]),
    ("1", "A fisherman kneels on a jetty, lifting a lantern with his left hand, drawn as a watercolour.",
     ["Action - Hand (Character/Anthropomorphic)", "Relationship - Composition",
      "Action - Full-body (Character/Anthropomorphic)", "Style"],
     ["lifting a lantern with his left hand", "(a fisherman) on a jetty", "kneels", "watercolour"]),
    ("428", "In claymation style, a young sailor ties a knot on a wooden pier at dawn.",
     ["Style"], ["claymation style"]),
]


def unigenbench_csv_row(key: str, prompt: str, testpoints: list[str], descriptions: list[str]) -> str:
    dims = json.dumps({"Testpoints": testpoints, "Testpoint Description": descriptions}).replace('"', '""')
    return f'{key},"{prompt}","{dims}"'


def write_unigenbench_csv(path: Path, rows=SYNTHETIC_UNIGENBENCH_ROWS) -> Path:
    lines = ["index,prompt_en,sub_dims_en"] + [unigenbench_csv_row(*row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

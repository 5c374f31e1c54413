"""What several test files share: tiny models and training configs, and loopback servers.

Test modules import from here, never from each other (a test module imported by another
would have its tests collected twice under some runners, and its helpers live nowhere obvious).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import inspect
import io
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # benchmark prompt files beside the checkout (CI has them)
SHIPPED_MODEL = ROOT / "assets" / "shapes-sd3"


# ---- tiny models and training configs --------------------------------------------------------
def tiny_arch():
    """A shapes-architecture SD3 small enough to build and run in a fraction of a second."""
    from flowgrpo.worlds.shapes.model import ShapesArchitecture

    return ShapesArchitecture(image_size=16, vae_channels=8, patch_size=4, num_layers=1, num_heads=2, head_dim=8,
                              text_hidden=16, text_layers=2, text_projection=8)


def build_tiny_shapes_model(root: Path) -> Path:
    """A randomly initialised (seed 0) tiny shapes model saved as a diffusers folder under root."""
    from flowgrpo.worlds.shapes.model import build_pipeline, save_pipeline

    pipe = build_pipeline(tiny_arch(), root / "tok", seed=0)
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


# ---- loopback servers ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, port: int | None = None) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) while the ASGI `app` serves in a thread; stop it afterwards."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
    import json

    dims = json.dumps({"Testpoints": testpoints, "Testpoint Description": descriptions}).replace('"', '""')
    return f'{key},"{prompt}","{dims}"'


def write_unigenbench_csv(path: Path, rows=SYNTHETIC_UNIGENBENCH_ROWS) -> Path:
    lines = ["index,prompt_en,sub_dims_en"] + [unigenbench_csv_row(*row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

import os
import sys
from pathlib import Path

# Tests are small: one thread each keeps them predictable on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

import pytest  # noqa: E402

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "shapes-sd3"


def tiny_arch():
    from flowgrpo.worlds.shapes.model import ShapesArchitecture

    return ShapesArchitecture(image_size=16, vae_channels=8, patch_size=4, num_layers=1, num_heads=2, head_dim=8,
                              text_hidden=16, text_layers=2, text_projection=8)


@pytest.fixture(scope="session")
def tiny_shapes_model(tmp_path_factory) -> Path:
    """A randomly initialised shapes-architecture SD3 folder (16x16, one block)."""
    from flowgrpo.worlds.shapes.model import build_pipeline, save_pipeline

    root = tmp_path_factory.mktemp("tiny")
    pipe = build_pipeline(tiny_arch(), root / "tok", seed=0)
    return save_pipeline(pipe, root / "model", {"max_sequence_length": 1, "resolution": 16, "guidance": 2.0})

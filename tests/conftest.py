import os
import sys
from pathlib import Path

# Tests are small: one thread each keeps them predictable on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # test modules import the shared `helpers` package

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_shapes_model(tmp_path_factory) -> Path:
    """A randomly initialised shapes-architecture SD3 folder (16x16, one block)."""
    from helpers import build_tiny_shapes_model

    return build_tiny_shapes_model(tmp_path_factory.mktemp("tiny"))

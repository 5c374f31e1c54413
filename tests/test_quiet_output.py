"""Loading a model through flowgrpo prints nothing from third parties: no torch_dtype
deprecation, no torchvision image-processor notice, no weight-loading bars."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import warnings
warnings.simplefilter("default")  # show every warning once, as a fresh interpreter run from the shell does
from flowgrpo.hf_quiet import quiet_third_party
quiet_third_party()
import torch
from diffusers import StableDiffusion3Pipeline
from flowgrpo.models.sd3 import load_pipeline
load_pipeline(StableDiffusion3Pipeline, {model!r}, torch.float32)
print("loaded")
"""


def test_loading_the_demo_base_prints_only_our_lines():
    model = str(ROOT / "assets" / "shapes-sd3-cells-alt")
    out = subprocess.run([sys.executable, "-c", LOAD.format(model=model)], capture_output=True, text=True,
                         cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded"
    assert out.stderr.strip() == "", out.stderr

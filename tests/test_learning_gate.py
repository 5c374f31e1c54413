"""The learning gate: a change that breaks learning fails the suite, not only one that breaks code.

A seeded DiffusionNFT run of the demo recipe, cut down to one tag (colors) on its 8 training
prompts, 20 iterations of 32 images, on the base `make demo` trains. Its in-distribution
accuracy on those prompts (32 images each, 10-step ODE, CFG-free) must rise by GATE_MARGIN.
The margin, the noise it is set against and runs with learning broken on purpose (learning
rate 0, a reward blind to the prompt, the reward's sign flipped) are in docs/testing.md.
"""

import torch
from helpers import ROOT

from flowgrpo.config import load_config
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import train

GATE_MARGIN = 0.10  # about 3 standard deviations of the evaluation's noise (0.032, docs/testing.md)
GATE_OVERRIDES = [
    "data.train_tags=[colors]", "data.test=shapes:train", "data.test_tags=[colors]",
    "sample.prompts_per_step=8", "sample.group_size=4", "sample.batch_size=32", "optim.train_batch_size=32",
    "optim.steps=20", "run.eval_images_per_prompt=32", "run.eval_steps=10", "run.threads=2", "run.seed=0",
    "run.tensorboard=false"]


def gate_change(out, extra=()) -> tuple[float, float]:
    """(accuracy before, after) on the colors training prompts for the gate's run with `extra` overrides."""
    cfg = validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml",
                               GATE_OVERRIDES + [f"model.path={ROOT / 'assets' / 'shapes-sd3-cells-alt'}",
                                                 f"run.output_dir={out}", *extra]))
    threads = torch.get_num_threads()
    try:
        summary = train(cfg)
    finally:
        torch.set_num_threads(threads)  # the run sets its own; the rest of the suite runs on one
    return summary["before"]["per_tag"]["colors"], summary["after"]["per_tag"]["colors"]


def test_the_demo_recipe_learns_colour_in_twenty_iterations(tmp_path):
    before, after = gate_change(tmp_path)
    assert after - before >= GATE_MARGIN, (
        f"colors accuracy {before:.3f} -> {after:.3f}: the gate's run no longer learns "
        f"(needs +{GATE_MARGIN}); see docs/testing.md for what breaks it")

"""Model cards: `flowgrpo train` writes one beside the LoRA and `flowgrpo export` into the
exported folder; the card's quick-start code, run as written, loads exactly that artifact."""

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from flowgrpo.config import load_config
from flowgrpo.model_card import method_names
from flowgrpo.train_config import TrainConfig, validate

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "shapes-sd3-cells-alt"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Two iterations of the demo config on its base: a real, tiny NFT LoRA with a before/after
    evaluation on one held-out prompt set (2 images a prompt)."""
    from flowgrpo.trainer import train

    out = tmp_path_factory.mktemp("run")
    over = [f"model.path={BASE}", f"run.output_dir={out}", "optim.steps=2", "sample.prompts_per_step=2",
            "sample.group_size=4", "optim.train_batch_size=8", "sample.batch_size=8", "run.eval_images_per_prompt=2",
            "run.eval_steps=4", "run.threads=1", "optim.lr=0.05"]
    train(validate(load_config(TrainConfig, ROOT / "configs" / "demo.yaml", over)))
    return out


def _quick_start(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1
    return blocks[0]


def _run_quick_start(code: str, cwd: Path) -> np.ndarray:
    import os

    old = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, "quick_start", "exec"), {})
    finally:
        os.chdir(old)
    return np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(cwd / "sample.png"))


def test_train_writes_a_card_whose_quick_start_loads_the_trained_lora(demo_run, tmp_path):
    lora = demo_run / "lora"
    card = (lora / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in meta and f"# base_model: {BASE} is a local folder" in card  # the Hub checks ids
    assert meta["library_name"] == "diffusers"
    assert meta["pipeline_tag"] == "text-to-image" and "diffusionnft" in meta["tags"] and "license" not in meta
    assert "optim.policy_loss: nft" in card and "`shapes_partial` x 1.0" in card
    assert "| **overall** |" in card and "95% CI" in card  # the run's own before/after table
    assert "![eval-after](images/eval-after.png)" in card and (lora / "images" / "eval-after.png").is_file()
    assert "arXiv:2509.16117" in card and (lora / "config.yaml").is_file()
    code = _quick_start(card)
    assert f"pipe.load_lora_weights({str(lora)!r})" in code
    with_lora = _run_quick_start(code, tmp_path)
    # the same code without the LoRA line draws a different image: the card loads the trained weights
    base_only = _run_quick_start("\n".join(ln for ln in code.splitlines() if "load_lora_weights" not in ln),
                                 tmp_path)
    assert with_lora.shape == (32, 32, 3) and np.abs(with_lora.astype(int) - base_only).max() > 0


def test_export_writes_a_card_that_loads_the_exported_pipeline(demo_run, tmp_path):
    from flowgrpo.cli import main

    out = tmp_path / "export"
    assert main(["export", "--model", str(BASE), "--lora", str(demo_run / "lora"), "--merge-lora",
                 "--dtype", "float32", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    code = _quick_start(card)
    assert f"DiffusionPipeline.from_pretrained({str(out)!r}" in code and "load_lora_weights" not in code
    merged = _run_quick_start(code, tmp_path)
    via_lora = _run_quick_start(_quick_start((demo_run / "lora" / "README.md").read_text()), tmp_path)
    assert np.abs(merged.astype(int) - via_lora).max() <= 2  # fused weights draw what the LoRA draws


def test_a_hub_base_is_named_in_the_metadata(tmp_path):
    from flowgrpo.config import to_dict
    from flowgrpo.model_card import render_card

    cfg = to_dict(validate(load_config(TrainConfig, ROOT / "configs" / "recipes" / "flux_dev_prefgrpo.yaml")))
    card = render_card(cfg, {}, tmp_path / "lora")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert {"flow-grpo", "pref-grpo", "lora"} <= set(meta["tags"])
    assert "arXiv:2508.20751" in card and "arXiv:2505.05470" in card
    assert "DiffusionPipeline.from_pretrained('black-forest-labs/FLUX.1-dev'" in card


def test_method_names_follow_the_switches():
    def cfg(loss, weights, window=0):
        return {"optim": {"policy_loss": loss}, "reward": {"weights": weights}, "sample": {"window_size": window}}

    assert method_names(cfg("ratio", {"ocr": 1.0})) == ["Flow-GRPO"]
    assert method_names(cfg("ratio", {"pickscore": 1.0}, window=2)) == ["Flow-GRPO-Fast"]
    assert method_names(cfg("ratio", {"pref_winrate": 1.0, "clip": 1.0})) == ["Flow-GRPO", "Pref-GRPO"]
    assert method_names(cfg("ratio", {"adversarial": 1.0}, window=2)) == ["Flow-GRPO-Fast", "Adv-GRPO"]
    assert method_names(cfg("nft", {"shapes_partial": 1.0})) == ["DiffusionNFT"]
    assert method_names(cfg("awm", {"shapes_partial": 1.0})) == ["AWM"]

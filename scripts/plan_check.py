"""Check `flowgrpo plan` against measured memory: train a config on the CPU in a fresh process
and compare its peak resident memory with the plan's estimate for one process (device cpu).

    python scripts/plan_check.py                       # the shapes demo model and a random SD3 of 40M parameters
    python scripts/plan_check.py --config C [k=v ...]  # any config that runs on this machine

Prints estimate, measured peak and their ratio per case (docs/models.md, "Memory")."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# two iterations of make demo's config at a reduced size, LoRA on the shipped model
DEMO = [str(ROOT / "configs" / "demo.yaml"), "optim.steps=2", "sample.prompts_per_step=2", "run.eval_before=false",
        "data.test=", "run.tensorboard=false"]
# full fine-tuning with KL (a frozen reference copy) and EMA of a random SD3 large enough that
# its weights, not the interpreter, dominate
RANDOM_SD3_FULL = ["sample.num_steps=3", "sample.group_size=4", "sample.prompts_per_step=1", "sample.batch_size=4",
                   "sample.guidance=1.0", "optim.train_batch_size=4", "optim.steps=1", "model.lora.enabled=false",
                   "optim.kl_beta=0.04", "optim.ema_decay=0.9", "optim.ema_every=1", "run.eval_before=false",
                   "data.test=", "run.tensorboard=false", "reward.weights={jpeg_compressibility: 1.0}"]


def build_random_sd3(folder: Path) -> Path:
    """A shapes-architecture SD3 with a wide, deep transformer (random weights)."""
    from flowgrpo.worlds.shapes.model import ShapesArchitecture, build_pipeline, save_pipeline

    arch = ShapesArchitecture(image_size=32, vae_channels=8, patch_size=2, num_layers=8, num_heads=8, head_dim=64,
                              text_hidden=64, text_layers=2, text_projection=64)
    pipe = build_pipeline(arch, folder / "tok", seed=0)
    return save_pipeline(pipe, folder / "model", {"max_sequence_length": 1, "resolution": 32, "guidance": 1.0})


def measure(config: str | None, overrides: list[str], out: Path) -> tuple[float, float]:
    """Peak resident bytes of `flowgrpo train` in a fresh process, and its resident bytes once
    the libraries are imported (the plan's CPU runtime row)."""
    # the runtime row is read in the same process, after the imports and before the model
    code = ("import resource, sys, torch, diffusers, transformers, peft, accelerate, flowgrpo.trainer; "
            "from diffusers import StableDiffusion3Pipeline, FluxPipeline; "
            "print('BASE', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True); "
            "from flowgrpo.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    if config is None:  # `flowgrpo train` reads a file: write the defaults plus overrides
        from flowgrpo.config import load_config, save_config
        from flowgrpo.train_config import TrainConfig

        config = str(out.with_suffix(".yaml"))
        save_config(load_config(TrainConfig, None, overrides), config)
        overrides = []
    args = ["train", config] + overrides + [f"run.output_dir={out}", "run.threads=1"]
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    read = {line.split()[0]: float(line.split()[1]) * 1024 for line in res.stdout.splitlines()
            if line.startswith(("BASE", "PEAK"))}
    return read["PEAK"], read["BASE"]


def estimate(config: str | None, overrides: list[str], runtime: float | None = None) -> float:
    from flowgrpo.config import load_config
    from flowgrpo.plan import cpu_runtime_bytes, make_plan
    from flowgrpo.train_config import TrainConfig, validate

    cfg = validate(load_config(TrainConfig, config, overrides))
    runtime = cpu_runtime_bytes() if runtime is None else runtime
    return make_plan(cfg, 1, 1e6, device="cpu", runtime_bytes=runtime).total * 1e9


def cases(tmp: Path) -> dict[str, tuple[str | None, list[str]]]:
    model = build_random_sd3(tmp)
    return {"shapes demo model, LoRA (configs/demo.yaml, 2 prompts x 8)": (DEMO[0], DEMO[1:]),
            "random SD3 (8 blocks, width 512), full fine-tune + KL + EMA": (None, RANDOM_SD3_FULL + [f"model.path={model}"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a training config instead of the two built-in cases")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        todo = {args.config: (args.config, args.overrides)} if args.config else cases(Path(tmp))
        print(f"{'case':<66}{'estimate GB':>12}{'measured GB':>12}{'ratio':>7}")
        for i, (name, (config, overrides)) in enumerate(todo.items()):
            got, base = measure(config, overrides, Path(tmp) / f"run{i}")
            est = estimate(config, overrides, base)
            print(f"{name:<66}{est / 1e9:>12.3f}{got / 1e9:>12.3f}{est / got:>7.2f}")


if __name__ == "__main__":
    main()

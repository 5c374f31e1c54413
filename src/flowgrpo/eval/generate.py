"""Generate a benchmark's images: fixed per-image seeds, sharded over processes, resumable.

Image j of item `key` is `{key}_{j}.png` (UniGenBench's naming) and starts from the noise
seeded by `image_seed(seed, key, j)`: a hash of the three, so the same image comes out
whatever the batch, the number of processes or how often the run was restarted. Sampling
is the deterministic ODE (Euler) from that noise, with classifier-free guidance where the
model uses it.

Processes (torchrun / `accelerate launch`) take strided shards of the items: rank r of W
gets items r, r + W, ... PNGs are written atomically (temporary file, then rename), so a
killed run leaves only whole images, and a restart skips every image already on disk.
`manifest.json` records the settings, every item with its metadata, files and seeds; a
restart with different sampling settings into the same folder is refused rather than
mixing two models' images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .benchmarks import Benchmark, EvalError, load_benchmark

MANIFEST = "manifest.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that change pixels: a folder holds images of exactly one combination of these.
PIXEL_SETTINGS = ("model", "lora", "lora_scale", "steps", "guidance", "seed", "height", "width", "dtype")


@dataclass
class GenerateSettings:
    benchmark: str
    source: str
    model: str
    lora: str | None
    lora_scale: float
    images_per_prompt: int
    steps: int
    guidance: float
    seed: int
    height: int
    width: int
    dtype: str


def image_seed(seed: int, key: str, j: int) -> int:
    """63-bit seed of image j of item `key`: independent of batching, sharding and resuming."""
    digest = hashlib.sha256(f"{seed}/{key}/{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_name(key: str, j: int) -> str:
    return f"{key}_{j}.png"


def sampling_defaults(policy, model: str) -> dict:
    """Steps, guidance and resolution when not given: the model folder's flowgrpo_defaults.json
    (keys eval_steps, eval_guidance or guidance, resolution), else the published eval settings
    of its family."""
    from ..models.sd3 import model_defaults

    flux = type(policy).__name__ == "FluxPolicy"
    # FLUX.1: Pref-GRPO's UniGenBench inference (1024 px, 30 steps, guidance 3.5); SD3.5: Flow-GRPO's
    # eval; newer backends (Qwen-Image, FLUX.2): their model cards' settings, from the policy.
    out = {"steps": 30 if flux else 40, "guidance": 3.5 if flux else 4.5}
    if type(policy).__name__ not in ("FluxPolicy", "SD3Policy") and hasattr(policy, "sample_defaults"):
        card = policy.sample_defaults()
        out = {"steps": card.get("steps", out["steps"]), "guidance": card.get("guidance", out["guidance"])}
    res = policy.default_resolution() if hasattr(policy, "default_resolution") else (1024 if flux else 512)
    out["resolution"] = res
    d = model_defaults(model)
    out["steps"] = d.get("eval_steps", out["steps"])
    out["guidance"] = d.get("eval_guidance", d.get("guidance", out["guidance"]))
    out["resolution"] = d.get("resolution", out["resolution"])
    return out


def _shard_info(shard: tuple[int, int] | None, device) -> tuple[int, int, object, torch.device]:
    """(rank, world, state-or-None, device). An explicit shard means independent jobs (no barrier)."""
    if shard is not None:
        rank, world = shard
        if not 0 <= rank < world:
            raise EvalError(f"shard {rank}/{world} is out of range: use RANK/WORLD with 0 <= RANK < WORLD")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return rank, world, None, dev
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (torch.distributed.is_available()
                                                      and torch.distributed.is_initialized()):
        from accelerate import PartialState

        state = PartialState()
        return state.process_index, state.num_processes, state, torch.device(device or state.device)
    return 0, 1, None, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _read_manifest(out_dir: Path) -> dict | None:
    p = out_dir / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def _check_compatible(old: dict | None, settings: dict, bench: Benchmark) -> None:
    """Refuse to mix images: every pixel setting in `settings` must equal the folder's."""
    if not old:
        return
    prev = old.get("settings", {})
    diff = [k for k in PIXEL_SETTINGS if k in prev and k in settings and prev[k] != settings[k]]
    if diff:
        detail = ", ".join(f"{k}: {prev[k]!r} there, {settings[k]!r} now" for k in diff)
        raise EvalError(f"the output folder already holds images made with other settings ({detail}); "
                        f"use a new --out folder, or the same settings to resume")
    known = {it["key"]: it["prompt"] for it in old.get("items", [])}
    for it in bench.items:
        if it.key in known and known[it.key] != it.prompt:
            raise EvalError(f"the output folder's item {it.key} has another prompt ({known[it.key][:60]!r}); "
                            f"it was made from a different prompt file: use a new --out folder")


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _save_png(img: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_manifest(out_dir: Path, settings: GenerateSettings, bench: Benchmark) -> Path:
    """Settings plus every item with metadata, files and seeds; `done` counts images on disk."""
    n = settings.images_per_prompt
    items, done = [], 0
    for it in bench.items:
        files = [image_name(it.key, j) for j in range(n)]
        done += sum((out_dir / f).is_file() for f in files)
        items.append({"key": it.key, "prompt": it.prompt, "metadata": it.metadata, "files": files,
                      "seeds": [image_seed(settings.seed, it.key, j) for j in range(n)]})
    total = n * len(bench.items)
    data = {"format": "flowgrpo-eval-run/1", "settings": asdict(settings), "images_total": total,
            "images_done": done, "complete": done == total, "items": items}
    path = out_dir / MANIFEST
    _write_json_atomic(path, data)
    return path


def load_manifest(run_dir: str | Path) -> dict:
    p = Path(run_dir) / MANIFEST
    if not p.is_file():
        raise EvalError(f"{str(run_dir)!r} is not a generation run (no {MANIFEST}); make one with "
                        f"`flowgrpo eval generate`")
    return json.loads(p.read_text())


@torch.no_grad()
def generate(benchmark: str | Benchmark, model: str, lora: str | None = None, out_dir: str | Path = "eval_run",
             images_per_prompt: int | None = None, steps: int | None = None, guidance: float | None = None,
             seed: int = 0, *, resolution: int | None = None, batch_size: int = 4, limit: int | None = None,
             shard: tuple[int, int] | None = None, dtype: str = "auto", device: str | None = None,
             data_dir: str | None = None, prompts: str | None = None, lora_scale: float = 1.0,
             progress: bool = True) -> Path:
    """Generate every missing image of this process's shard; returns the manifest path."""
    from ..models import load_policy
    from ..sampling import rollout

    bench = benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark, data_dir, prompts, limit)
    rank, world, state, dev = _shard_info(shard, device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise EvalError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise EvalError(f"batch size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # What is known before loading the model is checked first: a refusal should not cost a FLUX load.
    given = {"model": str(model), "lora": str(lora) if lora else None, "lora_scale": float(lora_scale),
             "seed": int(seed), "dtype": dtype, "steps": steps, "guidance": guidance, "height": resolution,
             "width": resolution}
    _check_compatible(_read_manifest(out_dir), {k: v for k, v in given.items() if v is not None or k == "lora"},
                      bench)

    from diffusers.utils import logging as dlog

    bars_were_on = dlog.is_progress_bar_enabled()
    if not progress:
        dlog.disable_progress_bar()
    try:
        policy = load_policy(model, dtype=DTYPES[dtype], device=dev)
    finally:
        if bars_were_on:
            dlog.enable_progress_bar()
    if lora:
        policy.load_lora(lora, scale=lora_scale)
    d = sampling_defaults(policy, model)
    res = resolution or d["resolution"]
    settings = GenerateSettings(
        benchmark=bench.name, source=bench.source, model=str(model), lora=str(lora) if lora else None,
        lora_scale=float(lora_scale), images_per_prompt=int(images_per_prompt or bench.images_per_prompt),
        steps=int(steps or d["steps"]), guidance=float(d["guidance"] if guidance is None else guidance),
        seed=int(seed), height=int(res), width=int(res), dtype=dtype)
    if settings.images_per_prompt < 1 or settings.steps < 1:
        raise EvalError("images per prompt and steps must be at least 1")
    if rank == 0 or state is None:
        _check_compatible(_read_manifest(out_dir), asdict(settings), bench)
        write_manifest(out_dir, settings, bench)
    if state is not None:
        state.wait_for_everyone()

    n = settings.images_per_prompt
    todo = [(it, j) for it in bench.items[rank::world] for j in range(n)
            if not (out_dir / image_name(it.key, j)).is_file()]
    shape = policy.latent_shape(settings.height, settings.width)
    # FLUX.1-dev embeds its guidance and has no unconditional branch: no negative prompt to encode.
    use_cfg = settings.guidance != 1.0 and not getattr(policy, "guidance_embeds", False)
    negative = policy.encode_prompts([""]) if use_cfg else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"generate {rank + 1}/{world}" if world > 1 else "generate", unit="img")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        cond = policy.encode_prompts([it.prompt for it, _ in chunk])
        init = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
            image_seed(settings.seed, it.key, j))) for it, j in chunk])
        traj = rollout(policy, cond, negative, num_steps=settings.steps, guidance=settings.guidance,
                       noise_level=0.0, kind="ode", height=settings.height, width=settings.width,
                       generator=torch.Generator().manual_seed(settings.seed), init_latents=init)
        images = (traj.images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for (it, j), img in zip(chunk, images):
            _save_png(img, out_dir / image_name(it.key, j))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if state is not None:
        state.wait_for_everyone()
    if rank == 0 or state is None:
        write_manifest(out_dir, settings, bench)
    return out_dir / MANIFEST


def adopt(benchmark: str | Benchmark, images_dir: str | Path, images_per_prompt: int | None = None,
          label: str = "external", data_dir: str | None = None, prompts: str | None = None) -> Path:
    """Make a folder of images named `{key}_{j}.png` (made elsewhere, e.g. the published
    UniGenBench-Eval-Images) a run that `score` and `report` accept: writes its manifest."""
    bench = benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark, data_dir, prompts)
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise EvalError(f"image folder {str(images_dir)!r} does not exist")
    n = int(images_per_prompt or bench.images_per_prompt)
    missing = [image_name(it.key, j) for it in bench.items for j in range(n)
               if not (images_dir / image_name(it.key, j)).is_file()]
    if len(missing) == n * len(bench.items):
        raise EvalError(f"{images_dir} holds none of the expected images (e.g. {missing[0]}); files must be named "
                        f"{{key}}_{{j}}.png, key being the UniGenBench index or the prompt's position")
    settings = GenerateSettings(bench.name, bench.source, f"external:{label}", None, 1.0, n, 0, 0.0, -1, 0, 0,
                                "unknown")
    return write_manifest(images_dir, settings, bench)

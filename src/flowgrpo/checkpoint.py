"""Atomic, resumable training checkpoints.

A checkpoint is a folder `ckpt-{step:06d}` holding
  lora/                      the adapter in diffusers format (load_lora_weights accepts it)
  trainable.safetensors      every trained parameter by name (exact resume, LoRA or full)
  optimizer.pt               the optimizer state (tensors only; loaded with weights_only=True)
  ema.safetensors            EMA shadow weights, when EMA is on
  reward_<name>.safetensors  state of rewards that train (adversarial discriminators)
  state.json                 step, metrics history, config hash
It is written to `ckpt-XXXX.tmp` and renamed when complete, so a crash never leaves a
half-written checkpoint where `--resume` would find it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("ckpt-")
                  and not p.name.endswith(".tmp") and (p / "state.json").is_file())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(output_dir: str | Path, step: int, *, policy, named_params: dict[str, torch.Tensor],
                    optimizer, ema=None, rewards: dict | None = None, state: dict | None = None,
                    keep_last: int = 2) -> Path:
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:06d}"
    tmp = root / f"ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if getattr(policy, "lora", None) is not None:
        policy.save_trained(tmp / "lora")
    save_file(_tensors(named_params), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if ema is not None:
        save_file(_tensors(ema.state_dict()), tmp / "ema.safetensors")
    for name, reward in (rewards or {}).items():
        rstate = reward.state_dict()
        if rstate:
            save_file(_tensors(rstate), tmp / f"reward_{name.replace(':', '_').replace('/', '_')}.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, named_params: dict[str, torch.nn.Parameter], optimizer, ema=None,
                    rewards: dict | None = None) -> dict:
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a flowgrpo checkpoint (no state.json)")
    trained = load_file(path / "trainable.safetensors")
    missing = set(named_params) - set(trained)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} trained parameters (e.g. {sorted(missing)[0]}); "
                         f"was it written with another model or LoRA config?")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(trained[name].to(p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = json.loads((path / "state.json").read_text())
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(load_file(path / "ema.safetensors"), state.get("ema_updates", 0))
    for name, reward in (rewards or {}).items():
        f = path / f"reward_{name.replace(':', '_').replace('/', '_')}.safetensors"
        if f.is_file():
            reward.load_state_dict(load_file(f))
    return state

"""Model backends behind one protocol (base.Policy): SD3/SD3.5 (and the shapes model), FLUX.1,
Qwen-Image and FLUX.2.

`load_policy` picks the backend from the folder's `model_index.json` (or `backend=`), so the
trainer never names a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import Condition, Policy, index_condition

# pipeline class name -> "module:Class" of the policy that wraps it
BACKENDS = {
    "StableDiffusion3Pipeline": "flowgrpo.models.sd3:SD3Policy",
    "FluxPipeline": "flowgrpo.models.flux:FluxPolicy",
    "QwenImagePipeline": "flowgrpo.models.qwen_image:QwenImagePolicy",
    "Flux2Pipeline": "flowgrpo.models.flux2:Flux2Policy",
}
ALIASES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "qwen_image": "QwenImagePipeline",
           "flux2": "Flux2Pipeline"}


def _backend_for(model: str, backend: str | None) -> str:
    if backend and backend != "auto":
        if backend not in ALIASES:
            raise ValueError(f"unknown backend {backend!r}; use one of {sorted(ALIASES)} or 'auto'")
        return ALIASES[backend]
    index = Path(model) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name", "")
    lowered = model.lower()
    if "qwen-image" in lowered or "qwen_image" in lowered:
        return "QwenImagePipeline"
    if "flux.2" in lowered or "flux2" in lowered:
        return "Flux2Pipeline"
    if "flux" in lowered:
        return "FluxPipeline"
    return "StableDiffusion3Pipeline"


def load_policy(model: str, backend: str | None = "auto", dtype: torch.dtype = torch.float32, device="cpu",
                **kwargs) -> Policy:
    import importlib

    from .sd3 import ModelLoadError, check_model_path

    check_model_path(model)
    cls_name = _backend_for(model, backend)
    if cls_name not in BACKENDS:
        raise ModelLoadError(f"{model!r} is a {cls_name or 'unknown'} pipeline; supported: {sorted(BACKENDS)}")
    mod_name, attr = BACKENDS[cls_name].split(":")
    policy_cls = getattr(importlib.import_module(mod_name), attr)
    return policy_cls.from_pretrained(model, dtype=dtype, device=device, **kwargs)


__all__ = ["BACKENDS", "Condition", "Policy", "index_condition", "load_policy"]

"""Text-embedding cache: encode every prompt once, train without text encoders in memory.

T5-XXL alone is 4.7B parameters (9.5 GB in bf16); the training loop only ever needs its
outputs for a fixed prompt set, so `flowgrpo preprocess` writes them to disk (as Pref-GRPO
does for FLUX) and the policy reads rows back instead of loading the encoders.

Layout of a cache folder:
  shard-00000.safetensors ...   tensors "prompt_embeds" (n, L, D) and "pooled_projections" (n, P),
                                row r of every tensor belongs to one prompt
  index.json                    {"format": 1, "model", "backend", "max_sequence_length", "dtype",
                                 "shapes": {key: per-row shape}, "shards": [file, ...],
                                 "prompts": {prompt: [shard number, row]}}
index.json is written last (through a temporary file), so an interrupted run leaves either
the old index or the new one. Running preprocess again on the same folder encodes only
prompts it does not hold yet. The empty prompt "" is always included: it is the negative
prompt of true CFG.

A cache is tied to the model and the T5 sequence length it was made with; `CachedEncoder`
refuses a policy that differs in either (different embeddings would silently train on the
wrong condition).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .base import Condition
from .sd3 import ModelLoadError, load_pipeline, model_defaults

INDEX = "index.json"
FORMAT = 1
# Pipeline components a policy can go without when it reads embeddings from a cache.
TEXT_COMPONENTS = {
    "StableDiffusion3Pipeline": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                                 "tokenizer_3"),
    "FluxPipeline": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "QwenImagePipeline": ("text_encoder", "tokenizer"),
    "Flux2Pipeline": ("text_encoder", "tokenizer"),
}
DEFAULT_MAX_SEQUENCE_LENGTH = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512, "QwenImagePipeline": 512,
                               "Flux2Pipeline": 512}
# Backends whose condition is built in their own module: pipeline -> "module:function(pipe, prompts, msl, device)"
TEXT_ENCODE = {"QwenImagePipeline": "flowgrpo.models.qwen_image:encode_text",
               "Flux2Pipeline": "flowgrpo.models.flux2:encode_text"}


class EmbeddingCacheError(ModelLoadError):
    """A cache folder that is missing, malformed, or made for another model or sequence length."""


def encode_text(pipe, prompts: list[str], max_sequence_length: int, device) -> Condition:
    """The condition a policy feeds its transformer, from the pipeline's own encode_prompt.

    SD3: prompt_embeds = [CLIP-L ; CLIP-G] hidden states padded to the T5 width, then T5
    tokens; pooled = [CLIP-L ; CLIP-G] projections. FLUX: prompt_embeds = T5 tokens,
    pooled = CLIP-L pooled output."""
    name = type(pipe).__name__
    if name in TEXT_ENCODE:
        import importlib

        mod_name, attr = TEXT_ENCODE[name].split(":")
        return getattr(importlib.import_module(mod_name), attr)(pipe, prompts, max_sequence_length, device)
    if name.startswith("Flux"):
        emb, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                            max_sequence_length=max_sequence_length)
    else:
        emb, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                               do_classifier_free_guidance=False,
                                               max_sequence_length=max_sequence_length)
    return {"prompt_embeds": emb, "pooled_projections": pooled}


def model_key(model: str) -> str:
    """How a model is named in an index: a local folder by its absolute path, a hub id as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if (p / "model_index.json").is_file() else model


def pipeline_class_name(model: str, backend: str | None = "auto") -> str:
    from . import _backend_for

    return _backend_for(model, backend)


def load_text_pipeline(model: str, backend: str | None = "auto", dtype: torch.dtype = torch.float32):
    """The pipeline with its text encoders only (no transformer, no VAE): what encoding needs."""
    import diffusers

    cls_name = pipeline_class_name(model, backend)
    if cls_name not in TEXT_COMPONENTS:
        raise ModelLoadError(f"{model!r} is a {cls_name or 'unknown'} pipeline; supported: {sorted(TEXT_COMPONENTS)}")
    return load_pipeline(getattr(diffusers, cls_name), model, dtype, transformer=None, vae=None)


def _read_index(folder: Path) -> dict:
    path = folder / INDEX
    if not path.is_file():
        raise EmbeddingCacheError(f"{str(folder)!r} is not an embedding cache (no {INDEX}); "
                                  f"build one with `flowgrpo preprocess CONFIG`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EmbeddingCacheError(f"{path}: not valid JSON ({exc.msg}); rebuild the cache") from None
    if index.get("format") != FORMAT:
        raise EmbeddingCacheError(f"{path}: cache format {index.get('format')!r}, this version reads {FORMAT}; "
                                  f"rebuild the cache")
    return index


def build_cache(model: str, prompts: list[str], out: str | Path, *, backend: str | None = "auto",
                max_sequence_length: int | None = None, dtype: torch.dtype = torch.float32, device="cpu",
                batch_size: int = 16, shard_size: int = 1024, progress: bool = False) -> dict:
    """Encode `prompts` (and "") into `out`; returns a summary {"added", "total", "folder"}."""
    out = Path(out)
    cls_name = pipeline_class_name(model, backend)
    msl = max_sequence_length or model_defaults(model).get("max_sequence_length") \
        or DEFAULT_MAX_SEQUENCE_LENGTH.get(cls_name, 256)
    index = {"format": FORMAT, "model": model_key(model), "backend": cls_name, "max_sequence_length": msl,
             "dtype": None, "shapes": {}, "shards": [], "prompts": {}}
    if (out / INDEX).is_file():
        old = _read_index(out)
        if old["model"] != index["model"] or old["max_sequence_length"] != msl:
            raise EmbeddingCacheError(
                f"{out} holds embeddings of {old['model']} at max_sequence_length {old['max_sequence_length']}, "
                f"not {index['model']} at {msl}; write to another folder")
        index = old
    todo = [p for p in dict.fromkeys(["", *prompts]) if p not in index["prompts"]]
    if not todo:
        return {"added": 0, "total": len(index["prompts"]), "folder": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_text_pipeline(model, backend, dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    steps = range(0, len(todo), shard_size)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="shards", unit="shard")
    for start in steps:
        chunk = todo[start:start + shard_size]
        parts: dict[str, list[torch.Tensor]] = {}
        for b in range(0, len(chunk), batch_size):
            with torch.no_grad():
                enc = encode_text(pipe, chunk[b:b + batch_size], msl, device)
            for k, v in enc.items():
                parts.setdefault(k, []).append(v.detach().cpu())
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        shard = f"shard-{len(index['shards']):05d}.safetensors"
        save_file(tensors, out / shard)
        index["shards"].append(shard)
        index["dtype"] = str(next(iter(tensors.values())).dtype).replace("torch.", "")
        index["shapes"] = {k: list(v.shape[1:]) for k, v in tensors.items()}
        for row, p in enumerate(chunk):
            index["prompts"][p] = [len(index["shards"]) - 1, row]
        tmp = out / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, out / INDEX)
    return {"added": len(todo), "total": len(index["prompts"]), "folder": str(out)}


class CachedEncoder:
    """Reads a cache folder's rows back as a condition dict (same keys as encode_prompts)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = _read_index(self.folder)
        self.model: str = index["model"]
        self.backend: str = index["backend"]
        self.max_sequence_length: int = int(index["max_sequence_length"])
        self.shapes: dict[str, list[int]] = index["shapes"]
        self._shards: list[str] = index["shards"]
        self._where: dict[str, list[int]] = index["prompts"]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._where

    @property
    def prompts(self) -> list[str]:
        return list(self._where)

    def check(self, model: str, max_sequence_length: int | None) -> None:
        """Refuse a policy the cache was not made for."""
        if model_key(model) != self.model:
            raise EmbeddingCacheError(
                f"embedding cache {self.folder} was made for {self.model}, not {model_key(model)}; rebuild it with "
                f"`flowgrpo preprocess` for this model (or point model.embedding_cache elsewhere)")
        if max_sequence_length is not None and int(max_sequence_length) != self.max_sequence_length:
            raise EmbeddingCacheError(
                f"embedding cache {self.folder} has max_sequence_length {self.max_sequence_length}, the model is set "
                f"to {max_sequence_length}; set model.max_sequence_length={self.max_sequence_length} or rebuild")

    def check_dims(self, dims: dict[str, int]) -> None:
        for key, dim in dims.items():
            if key not in self.shapes or self.shapes[key][-1] != dim:
                raise EmbeddingCacheError(f"embedding cache {self.folder}: {key} has shape {self.shapes.get(key)}, "
                                          f"the transformer expects last dimension {dim}; rebuild the cache")

    def _handle(self, shard: int):
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / self._shards[shard]), framework="pt")
        return self._open[shard]

    def __call__(self, prompts: list[str], device=None) -> Condition:
        missing = [p for p in prompts if p not in self._where]
        if missing:
            raise EmbeddingCacheError(
                f"{len(missing)} prompt(s) are not in embedding cache {self.folder} (e.g. {missing[0]!r}); run "
                f"`flowgrpo preprocess` again with these prompts (it adds only the missing ones)")
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in self.shapes}
        for p in prompts:
            shard, row = self._where[p]
            h = self._handle(shard)
            for k in rows:
                rows[k].append(h.get_slice(k)[row:row + 1])
        return {k: torch.cat(v).to(device) if device is not None else torch.cat(v) for k, v in rows.items()}

"""Reference images for the adversarial reward: the positives its discriminator learns from.

A reference set is a JSON object mapping each prompt to a list of image files (Adv-GRPO's
format); paths may be absolute or relative to the JSON's folder::

    {"a photo of a red circle": ["images/red-circle/0.png", "images/red-circle/1.png"], ...}

`load_references("shapes")` instead renders references on the fly from each prompt's
metadata with the shapes world's renderer (a fresh scene every draw).

`flowgrpo make-references` fills a reference set from any text-to-image diffusers pipeline
(hub id or folder) or from the shapes renderer. Each image's seed is a hash of
(--seed, prompt, index), so an interrupted run resumed later writes the same images as an
uninterrupted one; existing PNGs are skipped, and PNGs and the JSON are written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import RewardError

ON_MISSING = ("error", "skip")
REFERENCES_JSON = "references.json"


# ---- reference sets ---------------------------------------------------------------------------

class ReferenceSet:
    """Prompt -> image files, validated at load.

    on_missing="error": a missing or unreadable-path file, a prompt with an empty list, or
    (at draw time) a prompt absent from the set raises RewardError naming it and the fix.
    on_missing="skip": missing files are dropped, prompts left without files are dropped,
    and draws for absent prompts return None (the caller leaves those images out).
    """

    def __init__(self, mapping: dict[str, list[Path]], source: str, on_missing: str = "error",
                 skipped_files: int = 0, skipped_prompts: int = 0):
        self.mapping = mapping
        self.source = source
        self.on_missing = on_missing
        self.skipped_files = skipped_files
        self.skipped_prompts = skipped_prompts

    @classmethod
    def load(cls, path: str | Path, on_missing: str = "error") -> "ReferenceSet":
        if on_missing not in ON_MISSING:
            raise RewardError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / REFERENCES_JSON
        if not path.is_file():
            raise RewardError(f"reference set {str(path)!r} does not exist; "
                              f"make one with `flowgrpo make-references --prompts FILE --out DIR`")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RewardError(f"reference set {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise RewardError(f"reference set {str(path)!r} must be a JSON object mapping prompt -> list of "
                              f"image files, got a {type(raw).__name__}")
        root = path.parent
        mapping: dict[str, list[Path]] = {}
        missing: list[str] = []
        empty: list[str] = []
        for prompt, files in raw.items():
            if isinstance(files, str):
                files = [files]
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise RewardError(f"reference set {str(path)!r}: the entry for {prompt!r} must be a list of "
                                  f"image file paths")
            found = []
            for f in files:
                p = Path(f).expanduser()
                p = p if p.is_absolute() else root / p
                if p.is_file():
                    found.append(p)
                else:
                    missing.append(str(p))
            if found:
                mapping[prompt] = found
            else:
                empty.append(prompt)
        if on_missing == "error":
            if missing:
                more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                raise RewardError(f"reference set {str(path)!r}: {len(missing)} image file(s) missing, e.g. "
                                  f"{', '.join(missing[:3])}{more}; regenerate them with `flowgrpo "
                                  f"make-references` (it skips existing files) or pass on_missing='skip'")
            if empty:
                raise RewardError(f"reference set {str(path)!r}: prompt {empty[0]!r} has no reference images "
                                  f"({len(empty)} such prompt(s)); add images or pass on_missing='skip'")
        if not mapping:
            raise RewardError(f"reference set {str(path)!r} holds no usable reference images")
        return cls(mapping, str(path), on_missing, len(missing), len(empty))

    def __len__(self) -> int:
        return len(self.mapping)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.mapping

    def files(self, prompt: str) -> list[Path] | None:
        files = self.mapping.get(prompt)
        if files is None and self.on_missing == "error":
            raise RewardError(f"prompt {prompt!r} has no references in {self.source}; add them with "
                              f"`flowgrpo make-references` or pass on_missing='skip'")
        return files

    def sample(self, prompts: list[str], metadata: list[dict | None], generator: torch.Generator,
               size: int | None = None) -> list[np.ndarray | None]:
        """One reference image (uint8 HxWx3, at its stored size) per prompt, drawn with
        `generator`; None for a prompt without references under on_missing="skip"."""
        out: list[np.ndarray | None] = []
        for prompt in prompts:
            files = self.files(prompt)
            if files is None:
                out.append(None)
                continue
            j = int(torch.randint(len(files), (1,), generator=generator))
            out.append(_read_rgb(files[j]))
        return out


class ShapesReferences:
    """References rendered by the shapes world's renderer from each prompt's metadata (or
    from the prompt itself when metadata is missing): every draw is a new valid scene."""

    source = "shapes renderer"
    on_missing = "error"

    def sample(self, prompts: list[str], metadata: list[dict | None], generator: torch.Generator,
               size: int | None = None) -> list[np.ndarray]:
        from ..worlds.shapes.grammar import GrammarError, parse_prompt
        from ..worlds.shapes.render import render

        out = []
        for prompt, meta in zip(prompts, metadata):
            try:
                record = meta if isinstance(meta, dict) and "include" in meta else parse_prompt(prompt)
            except GrammarError as exc:
                raise RewardError(f"shapes references: {exc}") from None
            seed = int(torch.randint(2**62, (1,), generator=generator))
            out.append(render(record, np.random.default_rng(seed), size or 32))
        return out


def load_references(spec: Any, on_missing: str = "error"):
    """"shapes", a reference JSON (or a folder holding references.json), or an object with a
    `sample(prompts, metadata, generator, size)` method."""
    if hasattr(spec, "sample"):
        return spec
    if isinstance(spec, str) and spec == "shapes":
        return ShapesReferences()
    if isinstance(spec, (str, Path)):
        return ReferenceSet.load(spec, on_missing)
    raise RewardError(f"references must be 'shapes' or a reference JSON path, got {spec!r}")


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise RewardError(f"reference image {str(path)!r} cannot be read: {exc}") from None


# ---- prompts ----------------------------------------------------------------------------------

def read_prompts(source: str | Path) -> list[tuple[str, dict | None]]:
    """Unique (prompt, metadata) pairs from a prompt source of `flowgrpo.data.load_prompts`
    (.txt, .jsonl, .csv, or shapes:train / shapes:test)."""
    from ..data import PromptFileError, load_prompts

    try:
        items = load_prompts(str(source))
    except PromptFileError as exc:
        raise RewardError(str(exc)) from None
    seen: dict[str, dict | None] = {}
    for item in items:
        seen.setdefault(item["prompt"], item["metadata"] or None)
    return list(seen.items())


# ---- make-references ----------------------------------------------------------------------------

def prompt_folder(prompt: str) -> str:
    """A readable, collision-free folder name for a prompt."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
    return f"{slug}-{hashlib.sha256(prompt.encode()).hexdigest()[:10]}"


def image_seed(seed: int, prompt: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{prompt}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_png(image: np.ndarray, path: Path) -> None:
    _atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def _write_json(obj: dict, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
    _atomic_write(path, write)


class _PipelineSource:
    """Any text-to-image diffusers pipeline, called with a list of per-image generators."""

    def __init__(self, model: str, device: str, dtype: str, steps: int | None, guidance: float | None,
                 size: int | None, extra: dict):
        import inspect

        from ..models.sd3 import check_model_path, load_pipeline, model_defaults

        check_model_path(model)  # before importing diffusers: a typo should fail fast
        from diffusers import DiffusionPipeline

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        self.pipe = load_pipeline(DiffusionPipeline, model, torch_dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        accepted = inspect.signature(self.pipe.__call__).parameters
        kwargs = self._model_defaults(model_defaults(model), accepted)
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        if size is not None:
            kwargs["height"] = kwargs["width"] = size
        kwargs.update(extra)
        unknown = sorted(k for k in kwargs if k not in accepted and "kwargs" not in accepted)
        if unknown:
            raise RewardError(f"{type(self.pipe).__name__} does not take {unknown}; drop them from the flags "
                              f"or --pipeline-kwargs")
        self.kwargs = kwargs

    @staticmethod
    def _model_defaults(defaults: dict, accepted) -> dict:
        """A model folder's flowgrpo_defaults.json as call arguments; references want the
        model's evaluation settings (eval_steps, eval_guidance) rather than its training ones."""
        out = {}
        if "max_sequence_length" in defaults:
            out["max_sequence_length"] = defaults["max_sequence_length"]
        if "eval_steps" in defaults:
            out["num_inference_steps"] = defaults["eval_steps"]
        guidance = defaults.get("eval_guidance", defaults.get("guidance"))
        if guidance is not None:
            out["guidance_scale"] = guidance
        if "resolution" in defaults:
            out["height"] = out["width"] = defaults["resolution"]
        return {k: v for k, v in out.items() if k in accepted}

    def __call__(self, prompt: str, meta: dict | None, seeds: list[int]) -> list[np.ndarray]:
        gens = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        out = self.pipe(prompt=[prompt] * len(seeds), generator=gens, **self.kwargs).images
        if isinstance(out, list) and out and hasattr(out[0], "convert"):
            return [np.asarray(im.convert("RGB")) for im in out]
        arr = np.asarray(out)
        return list((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)) if arr.dtype != np.uint8 else list(arr)


class _ShapesSource:
    def __init__(self, size: int | None):
        self.size = size or 32

    def __call__(self, prompt: str, meta: dict | None, seeds: list[int]) -> list[np.ndarray]:
        from ..worlds.shapes.grammar import GrammarError, parse_prompt
        from ..worlds.shapes.render import render

        try:
            record = meta if meta and "include" in meta else parse_prompt(prompt)
            return [render(record, np.random.default_rng(s), self.size) for s in seeds]
        except GrammarError as exc:
            raise RewardError(f"--shapes: {exc}") from None


def make_references(prompts: list[tuple[str, dict | None]], out: str | Path, source, n: int = 8, seed: int = 0,
                    batch_size: int = 8, log=print) -> Path:
    """Fill `out` with n PNGs per prompt from `source(prompt, meta, seeds) -> images` and
    write out/references.json (merged with an existing one). Existing PNGs are kept."""
    out = Path(out)
    json_path = out / REFERENCES_JSON
    mapping: dict[str, list[str]] = {}
    if json_path.is_file():
        try:
            mapping = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            raise RewardError(f"{json_path} exists but is not valid JSON; move it away and rerun") from None
        if not isinstance(mapping, dict):
            raise RewardError(f"{json_path} exists but is not a prompt -> files map; move it away and rerun")
    made = kept = 0
    start = time.time()
    for k, (prompt, meta) in enumerate(prompts):
        rel = [f"images/{prompt_folder(prompt)}/{j}.png" for j in range(n)]
        todo = [j for j in range(n) if not (out / rel[j]).is_file()]
        kept += n - len(todo)
        for c in range(0, len(todo), batch_size):
            chunk = todo[c:c + batch_size]
            images = source(prompt, meta, [image_seed(seed, prompt, j) for j in chunk])
            for j, img in zip(chunk, images):
                _save_png(img, out / rel[j])
            made += len(chunk)
        previous = [f for f in mapping.get(prompt, []) if f not in rel and (out / f).is_file()]
        mapping[prompt] = rel + previous
        if (k + 1) % 50 == 0:
            _write_json(mapping, json_path)  # so an interrupted run leaves a usable partial set
            log(f"{k + 1}/{len(prompts)} prompts, {made} images made, {kept} kept, {time.time() - start:.0f}s")
    _write_json(mapping, json_path)
    log(f"wrote {json_path}: {len(prompts)} prompts x {n} images ({made} made, {kept} already there)")
    return json_path


def _cmd_make_references(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise RewardError(f"--n must be at least 1, got {args.n}")
    try:
        extra = json.loads(args.pipeline_kwargs) if args.pipeline_kwargs else {}
    except json.JSONDecodeError as exc:
        raise RewardError(f"--pipeline-kwargs is not valid JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise RewardError("--pipeline-kwargs must be a JSON object, e.g. '{\"max_sequence_length\": 1}'")
    prompts = read_prompts(args.prompts)
    if args.shapes:
        if extra or args.steps is not None or args.guidance is not None:
            raise RewardError("--steps, --guidance and --pipeline-kwargs apply to --model only, not --shapes")
        source = _ShapesSource(args.size)
    else:
        source = _PipelineSource(args.model, args.device, args.dtype, args.steps, args.guidance, args.size, extra)
    make_references(prompts, args.out, source, n=args.n, seed=args.seed, batch_size=args.batch_size,
                    log=lambda m: print(m, file=sys.stderr))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "make-references", help="fill a reference image set (prompt -> images) for the adversarial reward",
        description="Generate N reference images per prompt with a diffusers text-to-image pipeline or the "
                    "shapes renderer, and write DIR/references.json. Resumable: existing images are kept.")
    p.add_argument("--prompts", required=True, help="prompt file: .txt (one a line), .jsonl (\"prompt\" field), "
                                                    ".csv (\"prompt\"/\"prompt_en\" column), or shapes:train")
    p.add_argument("--out", required=True, help="output folder (images/ and references.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers pipeline: hub id or local folder")
    src.add_argument("--shapes", action="store_true", help="render references with the shapes world's renderer")
    p.add_argument("--n", type=int, default=8, help="images per prompt (default 8)")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image seeds hash (seed, prompt, index)")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's; "
                                                          "32 for --shapes)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="pipeline dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--pipeline-kwargs", default=None,
                   help="extra pipeline call arguments as a JSON object, e.g. '{\"max_sequence_length\": 1}'")
    p.set_defaults(func=_cmd_make_references)

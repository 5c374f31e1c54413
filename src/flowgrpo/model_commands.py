"""Model commands: `preprocess` (the text-embedding cache) and `export` (a LoRA fused into a
full diffusers folder)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _preprocess(args) -> int:
    from .cli import UserError
    from .data import load_prompts
    from .models.cache import build_cache

    model, out, msl, dtype = args.model, args.out, args.max_sequence_length, args.dtype
    sources = list(args.prompts or [])
    if args.config:
        from .config import load_config
        from .train_config import TrainConfig, validate

        cfg = validate(load_config(TrainConfig, args.config, args.overrides))
        model = model or cfg.model.path
        out = out or cfg.model.embedding_cache
        msl = msl or cfg.model.max_sequence_length
        dtype = dtype or cfg.model.dtype
        sources += [s for s in (cfg.data.train, cfg.data.test) if s]
    elif args.overrides:
        raise UserError(f"overrides {args.overrides} need a CONFIG")
    if not model or not out or not sources:
        raise UserError("give CONFIG (with model.embedding_cache set, or --out DIR), "
                        "or --model M --prompts FILE --out DIR")
    prompts = [it["prompt"] for src in sources for it in load_prompts(src)]
    summary = build_cache(model, prompts, out, max_sequence_length=msl, dtype=_torch_dtype(dtype or "float32"),
                          device=args.device or _default_device(), batch_size=args.batch_size,
                          shard_size=args.shard_size, progress=True)
    print(f"embedding cache {summary['folder']}: {summary['added']} prompts encoded, {summary['total']} in all")
    return 0


def _resolve_transformer(folder: Path) -> Path:
    """A trained full model is saved as FOLDER/transformer; accept either level."""
    if (folder / "transformer" / "config.json").is_file():
        return folder / "transformer"
    if (folder / "config.json").is_file():
        return folder
    from .models.sd3 import ModelLoadError

    raise ModelLoadError(f"{str(folder)!r} holds no transformer (no config.json there or in transformer/)")


def export_model(model: str, out: str | Path, *, lora: str | None = None, transformer: str | None = None,
                 merge_lora: bool = False, lora_scale: float = 1.0, dtype: str = "bfloat16") -> Path:
    """Write a diffusers folder: the base pipeline with the trained transformer swapped in, or
    with the LoRA fused into its weights (W + scale * B A, computed in float32, then cast to
    `dtype`; the saved B already carries the trained alpha / r, so scale 1 is the trained model). Without `merge_lora` the LoRA is copied beside it, unfused, to
    `out/lora` (load it with `pipe.load_lora_weights(out / "lora")`)."""
    import torch
    from diffusers import DiffusionPipeline

    from .hf_quiet import diffusers_dtype_key
    from .models.sd3 import DEFAULTS_FILE, ModelLoadError, load_pipeline

    out = Path(out)
    if lora and transformer:
        raise ModelLoadError("give --lora or --transformer, not both")
    if lora and not Path(lora).is_dir():
        raise ModelLoadError(f"LoRA folder {lora!r} does not exist")
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"output folder {str(out)!r} is not empty; choose a new one")
    # float32 while fusing: a LoRA delta far below bf16's resolution of W would round away.
    pipe = load_pipeline(DiffusionPipeline, model, torch.float32)
    if transformer and (Path(transformer) / "state.json").is_file():  # a training checkpoint, whole or sharded
        from .checkpoint import read_trained

        weights = read_trained(transformer)  # the shards of every process joined
        missing, unexpected = pipe.transformer.load_state_dict(weights, strict=False)
        missing = [k for k in missing if k in dict(pipe.transformer.named_parameters())]  # buffers are not trained
        if missing or unexpected:
            raise ModelLoadError(f"checkpoint {transformer!r} does not hold this model's whole transformer "
                                 f"(e.g. {(missing or unexpected)[0]}); a LoRA run's checkpoint: pass --lora CKPT/lora")
    elif transformer:
        tr_dir = _resolve_transformer(Path(transformer))
        trained = type(pipe.transformer).from_pretrained(str(tr_dir), **{diffusers_dtype_key(): torch.float32})
        pipe.register_modules(transformer=trained)
    if lora and merge_lora:
        pipe.load_lora_weights(lora, adapter_name="trained")
        pipe.fuse_lora(lora_scale=lora_scale, adapter_names=["trained"])
        pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    pipe.to(_torch_dtype(dtype))
    pipe.save_pretrained(out)
    defaults = Path(model) / DEFAULTS_FILE
    if defaults.is_file():
        shutil.copy(defaults, out / DEFAULTS_FILE)
    if lora and not merge_lora:
        shutil.copytree(lora, out / "lora")
    (out / "flowgrpo_export.json").write_text(json.dumps(
        {"base": model, "lora": lora, "transformer": transformer, "merged": bool(lora and merge_lora),
         "lora_scale": lora_scale, "dtype": dtype}, indent=1))
    if lora or transformer:
        from .model_card import card_for_export

        card_for_export(out, lora or transformer, merged=bool(lora and merge_lora))
    return out


def _export(args) -> int:
    from .cli import UserError

    if not args.lora and not args.transformer:
        raise UserError("give --lora DIR (with --merge-lora to fuse it) or --transformer DIR (a full fine-tune)")
    out = export_model(args.model, args.out, lora=args.lora, transformer=args.transformer,
                       merge_lora=args.merge_lora, lora_scale=args.lora_scale, dtype=args.dtype)
    what = "fused LoRA" if args.lora and args.merge_lora else ("LoRA beside it" if args.lora else "trained transformer")
    card = " and its model card (README.md)" if (out / "README.md").is_file() else ""
    print(f"wrote a diffusers pipeline ({what}){card} to {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="encode prompts once into a text-embedding cache",
                       description="Encode the prompts of a training config (data.train, data.test and \"\") "
                                   "into safetensors shards plus index.json, so training needs no text encoders. "
                                   "Re-running adds only prompts the cache lacks.")
    p.add_argument("config", nargs="?", help="training config; model, prompts and model.embedding_cache come from it")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    p.add_argument("--model", help="hub id or diffusers folder (default: the config's model.path)")
    p.add_argument("--prompts", action="append", help="prompt file (txt/jsonl/csv or shapes:train); repeatable")
    p.add_argument("--out", help="cache folder (default: the config's model.embedding_cache)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default: the config's, else 256 for SD3, 512 for FLUX)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="encoder dtype (default: the config's model.dtype)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per encoder call")
    p.add_argument("--shard-size", type=int, default=1024, help="prompts per safetensors shard")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("export", help="write a full diffusers folder from a base model and a trained LoRA",
                       description="Fuse a trained LoRA into the base model (--merge-lora) or swap in a fully "
                                   "fine-tuned transformer, and save a diffusers pipeline folder that loads with "
                                   "from_pretrained.")
    p.add_argument("--model", required=True, help="base model: hub id or diffusers folder")
    p.add_argument("--lora", help="LoRA folder written by training (RUN/lora or a checkpoint's lora/)")
    p.add_argument("--transformer", help="full fine-tune instead of a LoRA: RUN/model, or a checkpoint folder "
                                         "(RUN/checkpoints/ckpt-N, whole or sharded by FSDP2)")
    p.add_argument("--out", required=True, help="new, empty output folder")
    p.add_argument("--merge-lora", action="store_true", help="fuse the LoRA into the weights (else copied to OUT/lora)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiple of the trained strength (1 = as trained)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the saved weights")
    p.set_defaults(func=_export)

"""`flowgrpo plan`: the memory a training config needs per GPU, before anyone rents GPUs.

Per process (one GPU): the transformer's weights (trained ones in float32), gradients and Adam
states of what trains, the copies some objectives keep (a frozen reference for KL under full
fine-tuning, EMA shadows, DiffusionNFT's old policy), activations kept for backward (measured
bytes per token and block, times tokens, blocks and the micro-batch; twice with true CFG), text
encoders unless the embedding cache replaces them, the VAE, reward models, and the runtime
(CUDA context and allocator slack, or on a CPU the interpreter with torch and diffusers loaded).
Under FSDP2 every per-parameter term is divided by the number of GPUs, plus the gathered
weights of the block that runs (and the next, prefetched); with CPU offload the shards, their
gradients and Adam states live in host memory.

Sizes come from the model folder's safetensors headers (exact counts, nothing loaded) or, for
the published models, from the architectures counted on the meta device (docs/models.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9

# Activation bytes kept for backward per token, per block and per unit of width, per byte of the
# compute dtype (scripts/activation_memory.py: frozen weights, memory-efficient attention):
# SD3.5-M 66.2 KB at width 1,536 in bf16 -> 66.2 * 1024 / (1536 * 2) = 22.1, and so on.
ACTIVATION_FACTOR = {"sd3": 22.1, "flux": 13.8, "qwen_image": 16.4, "flux2": 20.2}

# Published architectures (parameters counted from their configs on the meta device).
# lora_per_rank: LoRA parameters per unit of rank with the backend's default targets.
KNOWN_MODELS = {
    "stable-diffusion-3.5-medium": dict(backend="sd3", transformer=2.24e9, text=0.12e9 + 0.70e9 + 4.89e9, vae=0.08e9,
                                        width=1536, blocks=24, lora_per_rank=18.8e6 / 32, patch=16, text_tokens=77),
    "stable-diffusion-3.5-large": dict(backend="sd3", transformer=8.06e9, text=0.12e9 + 0.70e9 + 4.89e9, vae=0.08e9,
                                       width=2432, blocks=38, lora_per_rank=47.2e6 / 32, patch=16, text_tokens=77),
    "flux.2": dict(backend="flux2", transformer=32.22e9, text=24.01e9, vae=0.08e9, width=6144, blocks=56,
                   lora_per_rank=201e6 / 32, patch=16, text_tokens=0),
    "flux": dict(backend="flux", transformer=11.90e9, text=4.89e9 + 0.12e9, vae=0.08e9, width=3072, blocks=57,
                 lora_per_rank=179e6 / 64, patch=16, text_tokens=0),
    "qwen-image": dict(backend="qwen_image", transformer=20.43e9, text=8.29e9, vae=0.13e9, width=3072, blocks=60,
                       lora_per_rank=212e6 / 32, patch=16, text_tokens=0),
}

# Reward models that run in every training process (bytes); servers and judges run elsewhere.
REWARD_BYTES = {"pickscore": 4.0e9, "clip": 1.7e9, "clipscore": 1.7e9, "aesthetic": 1.7e9, "hpsv2": 4.0e9,
                "imagereward": 1.8e9, "adversarial": 0.35e9, "image_similarity": 0.35e9}

CUDA_RUNTIME = 2.0 * GB  # CUDA context, kernels and allocator slack: 2-4 GB in practice


@dataclass
class ModelSizes:
    backend: str
    transformer: float  # parameters
    text: float
    vae: float
    width: int
    blocks: int
    lora_per_rank: float
    patch: int  # pixels per token side
    text_tokens: int  # text tokens besides the T5 / LLM ones
    largest_block: float = 0.0  # parameters of the largest FSDP2 unit
    source: str = ""


@dataclass
class Plan:
    gpus: int
    gpu_memory: float  # GB per GPU
    strategy: str  # ddp | fsdp2 | fsdp2 + cpu offload
    rows: dict[str, float] = field(default_factory=dict)  # GB per GPU
    host_rows: dict[str, float] = field(default_factory=dict)  # GB of host memory per process (offload)
    batch: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fits: bool = True

    @property
    def total(self) -> float:
        return sum(self.rows.values())


def _safetensors_params(folder: Path) -> tuple[int, dict[str, tuple]]:
    """Parameter count and shapes of every tensor in a folder's safetensors files (headers only)."""
    from safetensors import safe_open

    total, shapes = 0, {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shape = tuple(h.get_slice(k).get_shape())
                shapes[k] = shape
                total += math.prod(shape)
    return total, shapes


def model_sizes(path: str, backend: str = "auto", lora_targets: list[str] | None = None) -> ModelSizes:
    """Sizes of a diffusers folder (read from its files) or of a published model (by hub id)."""
    folder = Path(path)
    if (folder / "model_index.json").is_file():
        return _folder_sizes(folder, lora_targets)
    key = path.lower()
    for name, spec in KNOWN_MODELS.items():
        if name in key:
            return ModelSizes(**spec, largest_block=spec["transformer"] / spec["blocks"], source=f"published {name}")
    raise FileNotFoundError(f"plan: no sizes for {path!r}: pass a local diffusers folder (e.g. after "
                            f"`huggingface-cli download {path}`) or one of the published models "
                            f"({', '.join(KNOWN_MODELS)})")


PIPELINE_BACKENDS = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "QwenImagePipeline": "qwen_image",
                     "Flux2Pipeline": "flux2"}


def _folder_sizes(folder: Path, lora_targets: list[str] | None) -> ModelSizes:
    index = json.loads((folder / "model_index.json").read_text())
    backend = PIPELINE_BACKENDS.get(index.get("_class_name", ""), "sd3")
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    transformer, shapes = _safetensors_params(folder / "transformer")
    text = sum(_safetensors_params(folder / name)[0] for name in index
               if name.startswith("text_encoder") and (folder / name).is_dir())
    vae = _safetensors_params(folder / "vae")[0] if (folder / "vae").is_dir() else 0
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text()) if (folder / "vae").is_dir() else {}
    targets = lora_targets or _default_targets(backend)
    # what peft adds: r x (in + out) for every linear weight whose module name ends with a target
    lora_per_rank = sum(s[0] + s[1] for k, s in shapes.items() if len(s) == 2 and k.endswith(".weight")
                        and any(k[:-len(".weight")].endswith(t) for t in targets))
    per_block: dict[tuple[str, str], int] = {}
    for k, s in shapes.items():
        parts = k.split(".")
        if len(parts) > 2 and parts[0].endswith("transformer_blocks") and parts[1].isdigit():
            per_block[parts[0], parts[1]] = per_block.get((parts[0], parts[1]), 0) + math.prod(s)
    return ModelSizes(backend, transformer, text, vae,
                      width=int(cfg.get("num_attention_heads", 1) * cfg.get("attention_head_dim", 1)),
                      blocks=int(cfg.get("num_layers", 0) + cfg.get("num_single_layers", 0)),
                      lora_per_rank=lora_per_rank,
                      patch=2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1) * int(cfg.get("patch_size") or 2),
                      text_tokens=_clip_tokens(folder) if backend == "sd3" else 0,
                      largest_block=max(per_block.values(), default=transformer), source=str(folder))


def _clip_tokens(folder: Path) -> int:
    """The CLIP context SD3 pads prompts to (77 for the published models)."""
    tok = folder / "tokenizer" / "tokenizer_config.json"
    if tok.is_file():
        return int(json.loads(tok.read_text()).get("model_max_length", 77))
    return 77


def _default_targets(backend: str) -> list[str]:
    from .models.flux import FLUX_LORA_TARGETS
    from .models.sd3 import SD3_LORA_TARGETS

    if backend == "flux":
        return FLUX_LORA_TARGETS
    if backend == "qwen_image":
        from .models.qwen_image import QWEN_IMAGE_LORA_TARGETS

        return QWEN_IMAGE_LORA_TARGETS
    if backend == "flux2":
        from .models.flux2 import FLUX2_LORA_TARGETS

        return FLUX2_LORA_TARGETS
    return SD3_LORA_TARGETS


def _text_tokens(sizes: ModelSizes, cfg, folder_defaults: dict) -> int:
    """Text tokens in the transformer's sequence: CLIP's 77 plus T5's for SD3; the T5 / LLM
    length for the others (Qwen-Image trims to the batch's longest prompt: 128 assumed)."""
    if sizes.backend == "qwen_image":
        return 128
    msl = cfg.model.max_sequence_length or folder_defaults.get("max_sequence_length") or (
        256 if sizes.backend == "sd3" else 512)
    return sizes.text_tokens + int(msl)


def make_plan(cfg, gpus: int, gpu_memory: float, nodes: int = 1, device: str = "cuda",
              runtime_bytes: float | None = None) -> Plan:
    """The per-GPU memory of training `cfg` on `gpus` GPUs per node x `nodes` (GB), the sharding it
    needs, and the batch each process runs."""
    from .algorithms.objectives import objective_class

    m, s, o = cfg.model, cfg.sample, cfg.optim
    world = gpus * nodes
    sizes = model_sizes(m.path, m.backend, list(m.lora.targets) or None)
    folder = Path(m.path)
    defaults = json.loads((folder / "flowgrpo_defaults.json").read_text()) \
        if (folder / "flowgrpo_defaults.json").is_file() else {}
    bytes_model = {"float32": 4, "bfloat16": 2, "float16": 2}[m.dtype]
    lora = m.lora.enabled
    trained = sizes.lora_per_rank * m.lora.rank if lora else sizes.transformer
    objective = objective_class(o.policy_loss)
    copies = (o.ema_decay > 0) + (o.policy_loss == "nft")  # float32 copies of what trains
    reference = (not lora) and objective.needs_reference(cfg)
    resolution = s.resolution or int(defaults.get("resolution", 0)) or 512
    tokens = (resolution // sizes.patch) ** 2 + _text_tokens(sizes, cfg, defaults)
    cfg_factor = 2 if s.guidance != 1.0 and sizes.backend in ("sd3", "qwen_image") else 1
    factor = ACTIVATION_FACTOR[sizes.backend]
    block_act = tokens * factor * sizes.width * bytes_model  # one block, one image
    if m.gradient_checkpointing:
        # only each block's input hidden states stay, plus one block's activations while it is recomputed
        per_image = (sizes.blocks * tokens * sizes.width * bytes_model + block_act) * cfg_factor
    else:
        per_image = sizes.blocks * block_act * cfg_factor

    plan_batch, warnings = _batch(cfg, world)
    micro = plan_batch["train_batch_size"]
    frozen = sizes.transformer * bytes_model if lora else 0.0
    trained_weights = trained * 4  # float32: the LoRA, or the whole transformer when it all trains
    state = trained * (4 + 8)  # gradients + two Adam moments, float32
    extra = trained * 4 * copies + (sizes.transformer * bytes_model if reference else 0.0)
    common = {
        "text encoders": 0.0 if m.embedding_cache else sizes.text * bytes_model,
        "VAE": sizes.vae * bytes_model,
        "reward models": sum(REWARD_BYTES.get(name, 0.0) for name in cfg.reward.weights),
        f"activations ({micro} image{'s' if micro != 1 else ''} a micro-batch)": micro * per_image,
        "runtime": CUDA_RUNTIME if runtime_bytes is None else runtime_bytes,
    }
    weights_rows = {"transformer weights (frozen)": frozen, "trained weights (float32)": trained_weights,
                    "gradients + Adam states": state, "EMA / old-policy / reference copies": extra}

    def as_plan(strategy: str) -> Plan:
        plan = Plan(gpus, gpu_memory, strategy, batch=plan_batch, warnings=list(warnings))
        if strategy == "ddp":
            rows = dict(weights_rows)
        else:
            shard = 1.0 / world
            rows = {k + (" (1/%d shard)" % world): v * shard for k, v in weights_rows.items()}
            if strategy.endswith("offload"):
                plan.host_rows = dict(rows)
                rows = {}
            # the running block's gathered weights and the next one, prefetched
            rows["gathered blocks (2 units)"] = 2 * sizes.largest_block * bytes_model
        rows.update(common)
        plan.rows = {k: v / GB for k, v in rows.items()}
        plan.host_rows = {k: v / GB for k, v in plan.host_rows.items()}
        plan.fits = plan.total <= gpu_memory
        return plan

    for strategy in ("ddp", "fsdp2", "fsdp2 + cpu offload"):
        if strategy != "ddp" and world == 1:
            break
        plan = as_plan(strategy)
        if plan.fits:
            break
    if not plan.fits:
        plan.warnings.append(f"needs {plan.total:.1f} GB a GPU with {plan.strategy}, more than {gpu_memory:g} GB: "
                             + ("set model.gradient_checkpointing=true or lower optim.train_batch_size"
                                if not m.gradient_checkpointing else "lower optim.train_batch_size or add GPUs"))
    plan.batch["sizes"] = sizes.source
    return plan


def _batch(cfg, world: int) -> tuple[dict, list[str]]:
    """What each process runs on `world` GPUs: the iteration's images are fixed by the config
    (sample.prompts_per_step x group_size, whatever the GPU count), so images per optimizer step
    are kept; per-process images and gradient accumulation change."""
    s, o = cfg.sample, cfg.optim
    images = s.prompts_per_step * s.group_size
    warnings = []
    if images % world:
        warnings.append(f"sample.prompts_per_step x group_size = {images} does not divide over {world} GPUs: "
                        f"choose prompts_per_step so that it does")
    per_process = images // world
    micro = min(o.train_batch_size, max(1, per_process))
    per_step = per_process / max(1, o.optimizer_steps)
    accumulation = max(1, math.ceil(per_step / micro))
    if per_process % s.group_size and s.group_size % max(1, per_process):
        warnings.append(f"a group of {s.group_size} straddles processes ({per_process} images each): rewards that "
                        f"judge whole groups are gathered to one process")
    if s.group_size % micro and micro % s.group_size:
        warnings.append(f"optim.train_batch_size {micro} splits groups of {s.group_size} across micro-batches "
                        f"(the loss is the same; bf16 recomputation may differ from the rollout's batch shapes)")
    if micro != s.batch_size and cfg.model.dtype != "float32":
        warnings.append(f"optim.train_batch_size {micro} != sample.batch_size {s.batch_size}: in bf16 the first "
                        f"inner step's ratio is 1 only when the update runs the rollout's batch shapes")
    return ({"images per iteration": images, "images per process": per_process,
             "optimizer steps per iteration": o.optimizer_steps, "images per optimizer step": images // max(1, o.optimizer_steps),
             "train_batch_size": micro, "micro-batches per optimizer step (accumulation)": accumulation}, warnings)


def format_plan(plan: Plan, recipe: str, nodes: int = 1) -> str:
    lines = [f"plan for {recipe} on {nodes} x {plan.gpus} GPU(s) of {plan.gpu_memory:g} GB "
             f"(sizes from {plan.batch.get('sizes', '')})", "",
             f"sharding: {plan.strategy}" + ("" if plan.fits else "  (does not fit)"), "",
             f"{'per GPU':<58}{'GB':>8}"]
    lines += [f"{k:<58}{v:>8.2f}" for k, v in plan.rows.items()]
    lines.append(f"{'total':<58}{plan.total:>8.2f}")
    if plan.host_rows:
        lines += ["", f"{'host memory per process (offloaded)':<58}{'GB':>8}"]
        lines += [f"{k:<58}{v:>8.2f}" for k, v in plan.host_rows.items()]
    lines += ["", "batch:"] + [f"  {k}: {v}" for k, v in plan.batch.items() if k != "sizes"]
    if plan.strategy != "ddp":
        lines += ["", "launch with parallel.strategy=fsdp2" + (" parallel.cpu_offload=true"
                                                               if "offload" in plan.strategy else "")]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def cpu_runtime_bytes() -> float:
    """Resident memory of a fresh interpreter with torch, diffusers, transformers, peft and
    accelerate imported, the pipeline classes loaded and an Accelerator made: what a CPU process
    holds before the model (the CPU's "runtime" row)."""
    import subprocess
    import sys

    code = ("import resource, torch, diffusers, transformers, peft, accelerate, flowgrpo.trainer; "
            "from diffusers import StableDiffusion3Pipeline, FluxPipeline; accelerate.Accelerator(); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) * 1024


def _plan(args) -> int:
    from .config import load_config
    from .train_config import TrainConfig, validate

    cfg = validate(load_config(TrainConfig, args.recipe, args.overrides))
    runtime = cpu_runtime_bytes() if args.device == "cpu" else None
    plan = make_plan(cfg, args.gpus, args.gpu_memory, args.nodes, args.device, runtime)
    print(format_plan(plan, args.recipe, args.nodes))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory, sharding and batch of a recipe before renting GPUs",
                       description="Estimate the memory one training process needs (weights or their shard, "
                                   "trained weights, gradients and Adam states, copies, activations, text "
                                   "encoders, VAE, reward models, runtime), the sharding that fits "
                                   "(ddp, fsdp2, fsdp2 + cpu offload) and the batch each process runs.")
    p.add_argument("recipe", help="training config (e.g. configs/recipes/sd35m_geneval.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    p.add_argument("--gpus", type=int, default=8, help="GPUs (processes) per node")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB of memory per GPU")
    p.add_argument("--nodes", type=int, default=1, help="machines")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the runtime row is this machine's interpreter with the libraries loaded")
    p.set_defaults(func=_plan)

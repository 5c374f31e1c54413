"""Atomic, resumable training checkpoints, whole or sharded.

A checkpoint is a folder `ckpt-{step:06d}` holding
  lora/                         the adapter in diffusers format (load_lora_weights accepts it)
  trainable.safetensors         every trained parameter by name (exact resume, LoRA or full)
  optimizer.safetensors, .json  the optimizer's tensors by parameter name, and its hyper-parameters
  ema.safetensors               EMA shadow weights, when EMA is on
  reward_<name>.safetensors     state of rewards that train (adversarial discriminators) and of
                                the objective (DiffusionNFT's old policy: reward_objective)
  state.json                    step, summary, and the size of every file above
Under FSDP2 (sharded parameters) the tensor files are written by every process into
`rank-RRRRR-of-WWWWW/`, each holding its own shards; the header of each file records which
tensors are sharded and their whole shapes, so a checkpoint can be resumed on the same number
of processes (each reads its own folder) or on another (the shards are joined and re-split),
and `flowgrpo export` can join them into a model.

It is written to `ckpt-XXXX.tmp` and renamed when complete, so a crash never leaves a
half-written checkpoint where `--resume` would find it; `--resume` without a path takes the
newest checkpoint whose files are all there at their recorded sizes, and says which it skipped.
Nothing is unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .parallel import is_sharded, like_target, local_part

SHARDED_KEY = "flowgrpo_sharded"  # safetensors metadata: {tensor name: whole shape} of the sharded tensors


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed, with what to do about it."""


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("ckpt-")
                  and not p.name.endswith(".tmp") and (p / "state.json").is_file())


def latest_checkpoint(output_dir: str | Path, report=None) -> Path | None:
    """The newest intact checkpoint; `report(message)` hears about every newer damaged one skipped."""
    for path in reversed(checkpoint_dirs(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if report is not None:
            report(f"checkpoint {path} is damaged ({problem}); trying the one before it")
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` cannot be resumed (a missing, truncated or unreadable file), or None."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        return "no state.json"
    except (OSError, ValueError) as exc:
        return f"state.json unreadable: {exc}"
    files = state.get("files") or {str(f.relative_to(path)): None for f in path.rglob("*.safetensors")}
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as handle:
                    handle.keys()
            except Exception as exc:  # noqa: BLE001 - any parse failure means the same: damaged
                return f"{rel} cannot be read ({str(exc).splitlines()[0]})"
    return None


def shard_folder(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}"


# ---- writing ----------------------------------------------------------------------------------
def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    whole = {k: list(v.shape) for k, v in tensors.items() if is_sharded(v)}
    local = {k: local_part(v).detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(local, path, metadata={SHARDED_KEY: json.dumps(whole)})


def optimizer_tensors(optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's per-parameter tensors keyed `<parameter name>/<state key>`, and the rest
    (hyper-parameters of each group) as JSON."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, values in sd["state"].items():
        for key, v in values.items():
            tensors[f"{names[index]}/{key}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"], "names": names}


def save_checkpoint(output_dir: str | Path, step: int, *, policy, named_params: dict[str, torch.Tensor],
                    optimizer, ema=None, rewards: dict | None = None, state: dict | None = None,
                    keep_last: int = 2, accelerator=None) -> Path | None:
    """Write the checkpoint of `step`. Call it on every process when `accelerator` is given (the
    LoRA is gathered, and under FSDP2 each process writes its shards); returns the folder on the
    main process, None elsewhere."""
    from .parallel import gathered

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    main = rank == 0
    barrier = accelerator.wait_for_everyone if accelerator else (lambda: None)
    sharded = any(is_sharded(p) for p in named_params.values())
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"ckpt-{step:06d}", root / f"ckpt-{step:06d}.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if getattr(policy, "lora", None) is not None:
        lora = gathered(policy.trained_state(), keep=main) if sharded else None  # a collective: every process
        if main:
            policy.save_trained(tmp / "lora", lora)
    written: dict[str, int] = {}
    if sharded or main:
        folder = tmp / shard_folder(rank, world) if sharded else tmp
        folder.mkdir(exist_ok=True)
        opt_tensors, opt_json = optimizer_tensors(optimizer, list(named_params))
        parts = {"trainable": dict(named_params), "optimizer": opt_tensors}
        if ema is not None:
            parts["ema"] = ema.state_dict()
        for name, reward in (rewards or {}).items():
            rstate = reward.state_dict()
            if rstate:
                parts[f"reward_{_safe(name)}"] = rstate
        for part, tensors in parts.items():
            _write_tensors(folder / f"{part}.safetensors", tensors)
        if main:
            (tmp / "optimizer.json").write_text(json.dumps(opt_json))
        written = {str(f.relative_to(tmp)): f.stat().st_size for f in folder.glob("*.safetensors")}
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        for part in gather_object([written]):
            written.update(part)
    if main:
        written.update({str(f.relative_to(tmp)): f.stat().st_size for f in (tmp / "lora").glob("*")})
        (tmp / "state.json").write_text(json.dumps({"step": step, "shards": world if sharded else 1,
                                                    "files": written, **(state or {})}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final if main else None


def _safe(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


# ---- reading ----------------------------------------------------------------------------------
class CheckpointReader:
    """Reads a checkpoint's tensors into the form this process needs: its own shards when the
    checkpoint was written by as many processes, else whole tensors joined from every shard and
    cut again as the targets are sharded."""

    def __init__(self, path: str | Path, rank: int = 0, world: int = 1):
        self.path = Path(path)
        problem = checkpoint_problem(self.path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {self.path} is damaged: {problem}; resume from an earlier "
                                  f"checkpoint (--resume with no path takes the newest intact one) or start afresh")
        self.state = json.loads((self.path / "state.json").read_text())
        self.shards, self.rank, self.world = int(self.state.get("shards", 1)), rank, world

    def _files(self, part: str) -> list[Path]:
        if self.shards == 1:
            return [self.path / f"{part}.safetensors"]
        return [self.path / shard_folder(r, self.shards) / f"{part}.safetensors" for r in range(self.shards)]

    def has(self, part: str) -> bool:
        return self._files(part)[0].is_file()

    def whole(self, part: str) -> dict[str, torch.Tensor]:
        """Every tensor of `part` whole (sharded ones joined along dim 0, as FSDP2 splits them)."""
        files = self._files(part)
        if len(files) == 1:
            return load_file(files[0])
        pieces = [load_file(f) for f in files]
        sharded = _sharded_keys(files[0])
        return {k: torch.cat([p[k] for p in pieces]) if k in sharded else v for k, v in pieces[0].items()}

    def read(self, part: str, targets: dict[str, torch.Tensor | None], require: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor of `part`, each shaped like its target where `targets` has one (a DTensor
        where the target is sharded; a plain tensor where it is None, plain or absent).
        `require`: every target must be in the checkpoint."""
        own = self.shards > 1 and self.shards == self.world
        if own and all(t is None or is_sharded(t) for t in targets.values()):
            f = self._files(part)[self.rank]
            values, sharded = load_file(f), _sharded_keys(f)
            is_local = True
        else:
            values, sharded, is_local = self.whole(part), set(), False
        missing = set(targets) - set(values)
        if require and missing:
            raise CheckpointError(f"checkpoint {self.path} lacks {len(missing)} tensors of {part} "
                                  f"(e.g. {sorted(missing)[0]}); was it written with another model or LoRA config?")
        return {k: like_target(v, targets[k], local=is_local and k in sharded) if targets.get(k) is not None else v
                for k, v in values.items()}


def _sharded_keys(file: Path) -> set[str]:
    with safe_open(str(file), framework="pt") as handle:
        meta = handle.metadata() or {}
    return set(json.loads(meta.get(SHARDED_KEY, "{}")))


def load_checkpoint(path: str | Path, *, named_params: dict[str, torch.nn.Parameter], optimizer, ema=None,
                    rewards: dict | None = None, rank: int = 0, world: int = 1) -> dict:
    reader = CheckpointReader(path, rank, world)
    trained = reader.read("trainable", dict(named_params))
    if set(trained) - set(named_params):
        raise CheckpointError(f"checkpoint {reader.path} trains other parameters than this run "
                              f"(e.g. {sorted(set(trained) - set(named_params))[0]}); another model or LoRA config?")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(trained[name])
    _load_optimizer(reader, optimizer, named_params)
    if ema is not None and reader.has("ema"):
        ema.load_state_dict(reader.read("ema", ema.state_dict()), reader.state.get("ema_updates", 0))
    for name, reward in (rewards or {}).items():
        part = f"reward_{_safe(name)}"
        if reader.has(part):
            # all saved tensors: a reward's state grows as it trains (optimizer moments appear)
            reward.load_state_dict(reader.read(part, reward.state_dict(), require=False))
    return reader.state


def _load_optimizer(reader: CheckpointReader, optimizer, named_params: dict[str, torch.Tensor]) -> None:
    meta = json.loads((reader.path / "optimizer.json").read_text())
    names = meta["names"]
    if names != list(named_params):
        raise CheckpointError(f"checkpoint {reader.path}: its optimizer holds other parameters than this run "
                              f"trains; was it written with another model or LoRA config?")
    keys = _keys(reader, "optimizer")
    # per-parameter states are sharded like their parameter; scalars (Adam's step) are not
    targets = {k: (named_params[k.rsplit("/", 1)[0]] if k.rsplit("/", 1)[0] in named_params
               and named_params[k.rsplit("/", 1)[0]].shape == shape else None) for k, shape in keys.items()}
    tensors = reader.read("optimizer", targets)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        state.setdefault(names.index(name), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _keys(reader: CheckpointReader, part: str) -> dict[str, torch.Size]:
    """Names and whole shapes of the tensors of `part`, without reading them."""
    f = reader._files(part)[0]
    with safe_open(str(f), framework="pt") as handle:
        whole = json.loads((handle.metadata() or {}).get(SHARDED_KEY, "{}"))
        return {k: torch.Size(whole[k]) if k in whole else torch.Size(handle.get_slice(k).get_shape())
                for k in handle.keys()}


def read_trained(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trained tensors, whole, whatever the number of processes that wrote it
    (for `flowgrpo export` and for comparing runs)."""
    return CheckpointReader(path).whole("trainable")

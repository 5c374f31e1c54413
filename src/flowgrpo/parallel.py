"""Sharded training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

With `parallel.strategy: fsdp2` every transformer block is one sharding unit (the backend says
which modules are blocks: `Policy.shard_units`), then the root module holds what is left
(embeddings, final norm and projection). Each process keeps 1/N of every parameter, of its
gradient and of its optimizer states; a block's weights are all-gathered just before it runs and
freed after it. Trained weights stay float32: with `model.dtype: bfloat16` the gathered copies
are cast to bfloat16 for compute and gradients are reduced in float32.

Everything that copies the trained weights (EMA shadows, DiffusionNFT's old policy) clones the
sharded parameters, so it is sharded the same way for free. Gathering whole tensors is a
collective: every process must call `full_tensor` / `gathered` in the same order.
"""

from __future__ import annotations

from typing import Iterable

import torch

STRATEGIES = ("ddp", "fsdp2")


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's piece of a sharded tensor (the tensor itself when not sharded)."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def gathered(state: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor] | None:
    """Every tensor of `state` whole, on the CPU, in the dict's order: a collective for sharded
    ones, gathered one tensor at a time so that no process ever holds more than one whole tensor
    it does not keep. `keep` False (e.g. every process but the main one): gather, return None."""
    out = {}
    for k, v in state.items():
        whole = full_tensor(v.detach())
        if keep:
            out[k] = whole.cpu()
        del whole
    return out if keep else None


def shard_of(full: torch.Tensor, like) -> torch.Tensor:
    """The piece of the whole tensor `full` that this process holds of the sharded tensor `like`
    (how FSDP2 splits dim 0: torch.chunk over the mesh, trailing ranks possibly empty)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, like.device_mesh, like.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[index]


def like_target(value: torch.Tensor, target: torch.Tensor, local: bool) -> torch.Tensor:
    """`value` in the form of `target`: a DTensor with its mesh and placements when `target` is
    sharded (`local`: value is already this process's piece, else the whole tensor), else `value`."""
    if not is_sharded(target):
        return value
    from torch.distributed.tensor import DTensor

    piece = value if local else shard_of(value, target)
    return DTensor.from_local(piece.to(target.dtype), target.device_mesh, target.placements,
                              shape=target.shape, stride=target.stride(), run_check=False)


def shard_module(module: torch.nn.Module, units: Iterable[torch.nn.Module], *, compute_dtype: torch.dtype,
                 cpu_offload: bool = False, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Apply fully_shard to each unit, then to `module` (in place; its parameters become DTensors)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("parallel.strategy fsdp2 needs a distributed launch (torchrun or accelerate launch); "
                           "a single process trains with parallel.strategy ddp")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                              reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **kw)
    # the root's parameters are used last in backward: no need to free them after forward
    fully_shard(module, reshard_after_forward=False, **kw)
    return module


def set_gradient_sync(module: torch.nn.Module, sync: bool) -> None:
    """FSDP2: skip the reduce-scatter on backward passes that only accumulate gradients."""
    setter = getattr(module, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(sync)

"""What a reward is: it scores images and knows nothing of training.

Images travel as uint8 arrays (B, H, W, 3). Three kinds share one call:

    reward(images, prompts, metadata, group_ids) -> RewardOutput

- pointwise (`kind = "pointwise"`): one score per image, independent of the others.
- pairwise (`kind = "pairwise"`): needs whole prompt groups (`needs_groups = True`); the
  trainer hands it every image of a group at once, gathered across processes.
- adversarial (`kind = "adversarial"`): pointwise at scoring time, but holds a trainable
  discriminator that the trainer updates through `update(...)` and checkpoints through
  `state_dict()` / `load_state_dict()`.

The trainer calls a reward on parts of an iteration's images (each sampling batch; each
prompt group for rewards that need groups), in worker threads while the next batch samples
(rewards/pipeline.py). Calls of one reward run one at a time, in order, unless the reward
declares `concurrent_calls > 1` (it is thread-safe: an HTTP client, say). The parts' `info`
counters are summed; keys named in `mean_info` (rates and means) are averaged, weighted by
the number of images in each part.

Rewards are made by name from a registry (`make_reward("shapes_strict")`), so configs and
the reward server can name any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class RewardOutput:
    scores: np.ndarray  # (B,) float
    components: dict[str, np.ndarray] = field(default_factory=dict)  # named sub-scores for logging
    info: dict[str, float] = field(default_factory=dict)  # counters: failures, judge calls, ...


class RewardError(RuntimeError):
    """A reward that cannot be built or called, with what to do about it."""


class Reward:
    name: str = "reward"
    kind: str = "pointwise"
    needs_groups: bool = False
    concurrent_calls: int = 1  # calls that may run at once from worker threads (thread-safe rewards only)
    mean_info: tuple[str, ...] = ()  # info keys (or "key/" prefixes) that are rates or means, not counts

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict] | None = None,
                 group_ids: np.ndarray | None = None) -> RewardOutput:
        raise NotImplementedError

    # Only adversarial rewards train; the defaults make every reward checkpointable.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def merge_info(reward: Reward, parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """One info dict from the calls on parts of a batch: (images in the part, its info) each.
    Counts add up; the reward's `mean_info` keys are image-weighted means (NaN parts skipped)."""
    if len(parts) == 1:
        return dict(parts[0][1])
    means = tuple(reward.mean_info)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for _, info in parts for k in info):
        vals = [(n, float(info[key])) for n, info in parts if key in info]
        if key in means or any(p.endswith("/") and key.startswith(p) for p in means):
            vals = [(n, v) for n, v in vals if np.isfinite(v)]
            weight = sum(n for n, _ in vals)
            out[key] = sum(n * v for n, v in vals) / weight if weight else float("nan")
        else:
            out[key] = sum(v for _, v in vals)
    return out


def as_uint8_images(images) -> np.ndarray:
    """Accept uint8 HWC arrays, float [0,1] arrays/tensors (BCHW or BHWC), or PIL images."""
    if isinstance(images, list) and images and hasattr(images[0], "convert"):
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise RewardError(f"expected a batch of images (B, H, W, 3), got shape {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return arr


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def available_rewards() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def make_reward(name: str, **kwargs) -> Reward:
    """Build a registered reward. `remote:URL` builds a client for a reward server."""
    _import_builtin()
    if name.startswith("remote:"):
        factory = _REGISTRY.get("remote")
        if factory is None:
            raise RewardError("remote rewards are not available in this install")
        return factory(url=name[len("remote:"):], **kwargs)
    if name not in _REGISTRY:
        raise RewardError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise RewardError(f"bad arguments for reward {name!r}: {exc}") from None


def _import_builtin() -> None:
    # Importing the modules registers their rewards; optional ones fail soft at build time.
    from . import jpeg, shapes  # noqa: F401
    for mod in ("clip", "ocr", "vlm", "geneval", "remote", "pairwise", "adversarial", "shapes_proxy"):
        try:
            __import__(f"{__package__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(__package__):
                continue
            raise

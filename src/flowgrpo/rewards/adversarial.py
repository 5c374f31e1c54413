"""Adv-GRPO's adversarial reward: a frozen feature backbone and a trainable discriminator head.

D(x) = head(norm(f(x))), where f is a frozen ViT (DINOv2 through transformers' `Dinov2Model`)
giving a CLS token and N patch tokens, `norm` a parameter-free per-token normalisation, and
head an MLP dim -> round(2 dim / 3) -> GELU -> 1 (768 -> 512 -> 1 for DINOv2-B) shared by
CLS and patch tokens. Only the head trains: Adam, lr 1e-4, betas (0.5, 0.999).

Reward of an image (no gradient):
    r = w_cls * D(cls) + w_patch * mean_{p in P} D(patch_p),      w = (0.7, 0.3)
with P = `n_patches` (64) patch positions. P is drawn from a generator seeded by
(seed, number of head updates so far): every image scored between two updates sees the same
positions, so a score depends on the image and the head only (not on the batch it came in
with), while the positions still move as the head trains.

One discriminator step (`update`), references r of the batch's prompts positive, the
generated images g negative, hinge loss:
    L = 1/2 [mean relu(1 - D(r_cls)) + mean relu(1 + D(g_cls))]
      + lambda * 1/2 [mean relu(1 - D(r_patch)) + mean relu(1 + D(g_patch))],   lambda = 0.3
where the patch terms run over `n_patches` positions drawn per image from a stateful
generator that is checkpointed with the head.

By default training and scoring share one normalisation (`feature_norm`, layer norm). The
official code trains the head on the backbone's tokens as they come and scores unit-L2-normalised
ones, x / (||x|| + 1e-6), so its reward scores inputs its head never saw; `feature_norm="none"`
with `score_feature_norm="unit"` reproduces that (docs/fidelity.md).
"""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward, RewardError, RewardOutput, as_uint8_images, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "facebook/dinov2-base"
FEATURE_NORMS = ("layernorm", "l2", "unit", "none")


# ---- backbone -------------------------------------------------------------------------------

class FeatureBackbone(nn.Module):
    """A frozen `Dinov2Model` that maps uint8 images to (CLS (B, D), patches (B, N, D)).

    Images are converted to [0, 1], resized to `image_size` square with torch's antialiased
    bicubic interpolation (the whole image is seen; non-square images are squashed), and
    normalised with ImageNet statistics, as DINOv2 was trained. Features are the final
    layer-normed hidden states, returned in float32.
    """

    def __init__(self, model: nn.Module, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 batch_size: int = 32, name: str = "dinov2"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.name = name
        patch = model.config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        if self.image_size % patch:
            raise RewardError(f"backbone image size {self.image_size} is not a multiple of its patch size {patch}")
        self.num_patches = (self.image_size // patch) ** 2
        self.dim = int(model.config.hidden_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def pixels(self, images) -> torch.Tensor:
        """uint8 batch (B, H, W, 3) or a list of HxWx3 arrays of any sizes -> (B, 3, S, S)."""
        if not isinstance(images, np.ndarray) and len({np.shape(im) for im in images}) == 1:
            images = np.stack([np.asarray(im) for im in images])  # one resize call for the batch
        if isinstance(images, np.ndarray):
            groups = [images]
        else:
            groups = [np.asarray(im)[None] for im in images]
        out = []
        for g in groups:
            x = torch.from_numpy(np.array(g, dtype=np.uint8)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                  align_corners=False, antialias=True).clamp_(0, 1)
            out.append(x)
        x = torch.cat(out) if len(out) > 1 else out[0]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.pixels(images)
        dtype = next(self.model.parameters()).dtype
        cls, patches = [], []
        for i in range(0, pixels.shape[0], self.batch_size):
            hidden = self.model(pixel_values=pixels[i:i + self.batch_size].to(dtype)).last_hidden_state.float()
            cls.append(hidden[:, 0])
            patches.append(hidden[:, 1:])
        return torch.cat(cls), torch.cat(patches)

    def fingerprint(self) -> torch.Tensor:
        """Mean |w| of every weight tensor (float64), stored in checkpoints so that a head is
        never resumed on top of a different backbone. Compared with a relative tolerance of
        1e-3, so the same weights in bfloat16 still match while another seed or checkpoint
        does not (small tensors such as the CLS token differ by percents)."""
        return torch.stack([p.detach().float().abs().mean().double().cpu() for p in self.model.parameters()])


def shapes_backbone(seed: int = 0, image_size: int = 32) -> FeatureBackbone:
    """The CPU backbone for the 32x32 shapes world: a seeded, randomly initialised tiny
    `Dinov2Model` (patch 4 -> 8x8 = 64 patch tokens, width 192, 2 layers, 4 heads, weights
    drawn with std 0.1 instead of 0.02).

    Why random weights: there are no pretrained weights for 32x32 flat shapes, and a trained
    backbone would need its own recipe and data. A shallow random ViT is, through its
    residual stream, close to a random projection of each 4x4 patch plus a mild attention
    mix, so colour, edges and layout stay readable from the tokens and the trainable head
    does the discriminating. The larger init (std 0.1) matters: with 1024 renders against
    1024 corrupted renders of the same prompts (768/256 train/test), an MLP probe on the
    CLS token separates held-out images at 92% (3x3 blur), 76% (pixel noise sd 20),
    100% (15% dimmer), 86% (channel mix) versus 71/62/99/64% with the default std 0.02;
    on patch tokens 88/85/100/84%. Pixel noise is the weakest signal: random features
    average it out. It is the same `Dinov2Model` class, so the shapes demo runs the
    real-model code path; the seed fixes it, so checkpoints need only the head.
    """
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(image_size=image_size, patch_size=4, hidden_size=192, num_hidden_layers=2,
                       num_attention_heads=4, mlp_ratio=2, initializer_range=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(cfg)
    return FeatureBackbone(model, image_size, name=f"shapes-random-dinov2(seed={seed})")


def load_backbone(spec: Any = DEFAULT_BACKBONE, image_size: int | None = None, device=None,
                  dtype: str | torch.dtype = "float32", batch_size: int = 32, seed: int = 0) -> FeatureBackbone:
    """`spec`: "shapes", a hub id or local folder of a DINOv2 checkpoint, a `Dinov2Model`,
    or a ready `FeatureBackbone`. `image_size` defaults to the checkpoint's (518 for the
    released DINOv2 models)."""
    if isinstance(spec, FeatureBackbone):
        bb = spec
    elif isinstance(spec, str) and spec == "shapes":
        bb = shapes_backbone(seed, image_size or 32)
    elif isinstance(spec, nn.Module):
        bb = FeatureBackbone(spec, image_size or _config_size(spec.config), batch_size=batch_size,
                             name=type(spec).__name__)
    elif isinstance(spec, (str, Path)):
        model = _load_dinov2(str(spec), _dtype(dtype))
        bb = FeatureBackbone(model, image_size or _config_size(model.config), batch_size=batch_size, name=str(spec))
    else:
        raise RewardError(f"backbone must be 'shapes', a DINOv2 hub id or folder, or a module; got {spec!r}")
    return bb.to(_device(device))


def _config_size(config) -> int:
    size = config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _load_dinov2(spec: str, dtype: torch.dtype):
    from transformers import Dinov2Model

    from ..hf_quiet import transformers_dtype_key

    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists() or spec.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise RewardError(f"backbone folder {spec!r} does not exist; pass a DINOv2 folder or a hub id "
                              f"such as {DEFAULT_BACKBONE}")
        if not (path / "config.json").is_file():
            raise RewardError(f"backbone folder {spec!r} has no config.json; save one with "
                              f"Dinov2Model.save_pretrained or pass a hub id such as {DEFAULT_BACKBONE}")
    try:
        model = Dinov2Model.from_pretrained(str(path) if looks_local else spec, **{transformers_dtype_key(): dtype})
    except (OSError, ValueError) as exc:
        raise RewardError(f"could not load DINOv2 backbone {spec!r}: {str(exc).splitlines()[0]} "
                          f"(offline? download it first with `huggingface-cli download {spec}`)") from exc
    if getattr(model.config, "model_type", "dinov2") != "dinov2":
        raise RewardError(f"backbone {spec!r} is a {model.config.model_type!r} model; expected a DINOv2 checkpoint")
    return model


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[str(dtype)]
    except KeyError:
        raise RewardError(f"backbone dtype {dtype!r} is not one of float32, bfloat16, float16") from None


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- head and feature path ------------------------------------------------------------------

def make_head(dim: int, hidden: int | None = None, seed: int = 0) -> nn.Sequential:
    """MLP dim -> hidden -> GELU -> 1; hidden defaults to round(2 dim / 3) (512 for 768)."""
    hidden = int(hidden or round(2 * dim / 3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))


def _normalize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per token: "layernorm" = (x - mean) / std over the feature axis (no affine);
    "l2" = x / ||x|| * sqrt(D) (unit RMS, so the head's input scale does not depend on D);
    "unit" = x / (||x|| + 1e-6) (unit norm, the official scoring's); "none" = x."""
    if kind == "layernorm":
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)
    if kind == "l2":
        return F.normalize(x, dim=-1) * math.sqrt(x.shape[-1])
    if kind == "unit":
        return x / (x.norm(dim=-1, keepdim=True) + 1e-6)
    return x


def _gather_patches(patches: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """patches (B, N, D), idx (B, n) or (n,) -> (B, n, D)."""
    if idx.ndim == 1:
        return patches[:, idx]
    return torch.gather(patches, 1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))


def _stable_seed(*parts) -> int:
    digest = hashlib.sha256(struct.pack(f"<{len(parts)}q", *[int(p) for p in parts])).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---- the reward -----------------------------------------------------------------------------

class AdversarialReward(Reward):
    """Adv-GRPO's discriminator reward (formulas in the module docstring).

    Args:
        backbone: "shapes" (the CPU backbone for the shapes world), a DINOv2 hub id or folder,
            a `Dinov2Model` or a `FeatureBackbone`.
        references: "shapes" (rendered from each prompt's metadata), a reference JSON path
            (prompt -> image files, see references.py), or a references object.
        cls_weight, patch_weight: reward weights of D(CLS) and mean D(patches).
        loss_patch_weight: weight of the patch hinge term in the discriminator loss.
        n_patches: patch tokens sampled per image (all of them when the backbone has fewer).
        feature_norm: "layernorm", "l2", "unit" or "none": the tokens the head trains on, and
            scores unless `score_feature_norm` is given.
        score_feature_norm: None (= feature_norm) or one of the same, for scoring only; the
            official code trains on raw tokens ("none") and scores "unit"-normalised ones.
        on_missing: "error" or "skip" for prompts without references (and, when loading a
            JSON, for missing files); skipped prompts take no part in a discriminator step.
    """

    kind = "adversarial"
    name = "adversarial"

    def __init__(self, backbone: Any = DEFAULT_BACKBONE, references: Any = "shapes", *,
                 cls_weight: float = 0.7, patch_weight: float = 0.3, loss_patch_weight: float = 0.3,
                 n_patches: int = 64, feature_norm: str = "layernorm", score_feature_norm: str | None = None,
                 head_hidden: int | None = None,
                 lr: float = 1e-4, betas: Sequence[float] = (0.5, 0.999), seed: int = 0,
                 image_size: int | None = None, device: Any = None, dtype: str = "float32",
                 batch_size: int = 32, on_missing: str = "error"):
        from .references import load_references

        for key, value in (("feature_norm", feature_norm), ("score_feature_norm", score_feature_norm)):
            if value not in FEATURE_NORMS and not (key == "score_feature_norm" and value is None):
                raise RewardError(f"{key} must be one of {FEATURE_NORMS}, got {value!r}")
        if int(n_patches) < 1:
            raise RewardError(f"n_patches must be at least 1, got {n_patches}")
        if len(tuple(betas)) != 2:
            raise RewardError(f"betas must be two numbers, got {betas!r}")
        self.backbone = load_backbone(backbone, image_size, device, dtype, batch_size, seed)
        self.device = self.backbone.device
        self.references = load_references(references, on_missing=on_missing)
        self.cls_weight, self.patch_weight = float(cls_weight), float(patch_weight)
        self.loss_patch_weight = float(loss_patch_weight)
        self.n_patches = min(int(n_patches), self.backbone.num_patches)
        self.feature_norm = feature_norm  # training
        self.score_feature_norm = score_feature_norm or feature_norm
        self.seed = int(seed)
        self.head = make_head(self.backbone.dim, head_hidden, seed).to(self.device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=float(lr),
                                          betas=tuple(float(b) for b in betas))
        self.sampler = torch.Generator().manual_seed(_stable_seed(seed, 1))  # training draws
        self.n_updates = 0
        self._fingerprint: torch.Tensor | None = None

    # -- scoring ------------------------------------------------------------------------------
    def features(self, images, norm: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS (B, D), patches (B, N, D)) normalised as scoring does (or as `norm` says)."""
        cls, patches = self.backbone(images)
        kind = norm or self.score_feature_norm
        return _normalize(cls, kind), _normalize(patches, kind)

    def _d(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).squeeze(-1)

    def reward_positions(self) -> torch.Tensor:
        """The patch positions scored until the next update (shared by all images)."""
        g = torch.Generator().manual_seed(_stable_seed(self.seed, 2, self.n_updates))
        return torch.randperm(self.backbone.num_patches, generator=g)[: self.n_patches].to(self.device)

    @torch.no_grad()
    def __call__(self, images, prompts=None, metadata=None, group_ids=None) -> RewardOutput:
        images = as_uint8_images(images)
        cls, patches = self.features(images)
        d_cls = self._d(cls)
        d_patch = self._d(_gather_patches(patches, self.reward_positions())).mean(1)
        scores = self.cls_weight * d_cls + self.patch_weight * d_patch
        return RewardOutput(scores.cpu().numpy().astype(np.float64),
                            {"d_cls": d_cls.cpu().numpy().astype(np.float64),
                             "d_patch": d_patch.cpu().numpy().astype(np.float64)})

    # -- training -----------------------------------------------------------------------------
    def _train_positions(self, batch: int) -> torch.Tensor:
        n_all = self.backbone.num_patches
        return torch.rand(batch, n_all, generator=self.sampler).argsort(1)[:, : self.n_patches].to(self.device)

    def update(self, images, prompts: list[str], metadata: list[dict] | None = None) -> dict[str, float]:
        """One Adam step of the head: references of `prompts` positive, `images` negative.

        Returns d_loss, acc_ref (share of references with D(cls) > 0), acc_gen (share of
        samples with D(cls) < 0), both on the training features, reward_ref and reward_gen
        (mean reward as scoring computes it, with this step's patch draws, before the step)
        and d_skipped (images whose prompt has no reference
        under on_missing="skip")."""
        images = as_uint8_images(images)
        if len(prompts) != len(images):
            raise RewardError(f"update got {len(images)} images but {len(prompts)} prompts")
        meta = list(metadata) if metadata is not None else [None] * len(prompts)
        refs = self.references.sample(prompts, meta, self.sampler, size=images.shape[1])
        keep = [i for i, r in enumerate(refs) if r is not None]
        if not keep:
            return {"d_skipped": float(len(images))}
        gen_cls, gen_patch = self.backbone(images[keep])
        ref_cls, ref_patch = self.backbone([refs[i] for i in keep])
        gen_patch = _gather_patches(gen_patch, self._train_positions(len(keep)))
        ref_patch = _gather_patches(ref_patch, self._train_positions(len(keep)))
        raw = (ref_cls, gen_cls, ref_patch, gen_patch)  # normalisation is per token: gathering first is the same
        ref_cls, gen_cls, ref_patch, gen_patch = (_normalize(x, self.feature_norm) for x in raw)

        self.head.train()
        d_ref_cls, d_gen_cls = self._d(ref_cls), self._d(gen_cls)
        d_ref_patch, d_gen_patch = self._d(ref_patch), self._d(gen_patch)
        scored = (d_ref_cls, d_gen_cls, d_ref_patch, d_gen_patch)
        if self.score_feature_norm != self.feature_norm:  # the rewards as scoring computes them, head before the step
            with torch.no_grad():
                scored = tuple(self._d(_normalize(x, self.score_feature_norm)) for x in raw)
        loss_cls = 0.5 * (F.relu(1 - d_ref_cls).mean() + F.relu(1 + d_gen_cls).mean())
        loss_patch = 0.5 * (F.relu(1 - d_ref_patch).mean() + F.relu(1 + d_gen_patch).mean())
        loss = loss_cls + self.loss_patch_weight * loss_patch
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.head.eval()
        self.n_updates += 1

        with torch.no_grad():
            s_ref_cls, s_gen_cls, s_ref_patch, s_gen_patch = scored
            reward_ref = self.cls_weight * s_ref_cls + self.patch_weight * s_ref_patch.mean(1)
            reward_gen = self.cls_weight * s_gen_cls + self.patch_weight * s_gen_patch.mean(1)
            return {
                "d_loss": float(loss), "d_loss_cls": float(loss_cls), "d_loss_patch": float(loss_patch),
                "acc_ref": float((d_ref_cls > 0).float().mean()), "acc_gen": float((d_gen_cls < 0).float().mean()),
                "reward_ref": float(reward_ref.mean()), "reward_gen": float(reward_gen.mean()),
                "d_skipped": float(len(images) - len(keep)),
            }

    # -- checkpoints ----------------------------------------------------------------------------
    def _backbone_fingerprint(self) -> torch.Tensor:
        if self._fingerprint is None:
            self._fingerprint = self.backbone.fingerprint()
        return self._fingerprint

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors only (safetensors-ready): head weights, Adam moments and step counts,
        learning rate, the training sampler's state, the update count, and weight statistics
        of the frozen backbone."""
        state = {f"head.{k}": v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        opt = self.optimizer.state_dict()
        for idx, slots in opt["state"].items():
            for key, value in slots.items():
                state[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
        state["optim.lr"] = torch.tensor(float(opt["param_groups"][0]["lr"]), dtype=torch.float64)
        state["sampler.state"] = self.sampler.get_state().clone()
        state["n_updates"] = torch.tensor(self.n_updates, dtype=torch.int64)
        state["backbone.fingerprint"] = self._backbone_fingerprint().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in ("sampler.state", "n_updates", "optim.lr") if k not in state]
        if missing:
            raise RewardError(f"adversarial reward state lacks {missing}; "
                              f"was it saved by AdversarialReward.state_dict()?")
        if "backbone.fingerprint" in state:
            saved, ours = state["backbone.fingerprint"], self._backbone_fingerprint()
            if saved.shape != ours.shape or not torch.allclose(saved.double(), ours, rtol=1e-3, atol=0.0):
                raise RewardError(f"the saved discriminator was trained on another backbone (its weight statistics "
                                  f"differ from {self.backbone.name}'s); build the reward with the same backbone")
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        try:
            self.head.load_state_dict(head_state)
        except RuntimeError as exc:
            raise RewardError(f"saved discriminator head does not fit this backbone: "
                              f"{str(exc).splitlines()[0]}") from None
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in state.items():
            if k.startswith("optim.") and k != "optim.lr":
                _, idx, key = k.split(".", 2)
                slots.setdefault(int(idx), {})[key] = v.clone()
        opt = self.optimizer.state_dict()
        opt["state"] = slots
        for group in opt["param_groups"]:
            group["lr"] = float(state["optim.lr"])
        self.optimizer.load_state_dict(opt)
        self.sampler.set_state(state["sampler.state"].clone())
        self.n_updates = int(state["n_updates"])
        self.head.eval()


@register("adversarial")
def _adversarial(**kw) -> AdversarialReward:
    return AdversarialReward(**kw)

"""CLIP-family rewards: PickScore, CLIPScore, LAION aesthetic, plain CLIP similarity, image
similarity to references; ImageReward and HPSv2.1 as optional backends.

Every CLIP model loads through transformers' `CLIPModel` / `CLIPProcessor` from a hub id or a
local folder (`model=...`, `processor=...`), or, with `backend="open_clip"`, through open_clip
for models published only in its format (e.g. `hf-hub:apple/DFN5B-CLIP-ViT-H-14-378`).
Embeddings are L2-normalised; with s = exp(logit_scale) of the model:

- pickscore: s · cos(text, image) / 26   (PickScore_v1 weights, CLIP-ViT-H-14 processor)
- clipscore: s · cos(text, image) / 30   (openai/clip-vit-large-patch14)
- clip:      cos(text, image)            (any CLIP; `logit_scale=true` and `divisor` to rescale)
- aesthetic: MLP(768-1024-128-64-16-1) on the normalised CLIP-L/14 image embedding
- image_similarity: mean (or max) over an image's references of cos(image, reference)

torch and transformers are imported when a reward is built, so importing this module is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import Reward, RewardError, RewardOutput, as_uint8_images, register

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_WEIGHTS_HINT = ("the LAION aesthetic MLP weights 'sac+logos+ava1-l14-linearMSE.pth' from "
                          "github.com/christophschuhmann/improved-aesthetic-predictor (or a .safetensors "
                          "made from it with flowgrpo.rewards.clip.convert_aesthetic_weights)")


def _torch():
    import torch

    return torch


def _device(device: str | None) -> str:
    torch = _torch()
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(dtype: str):
    torch = _torch()
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise RewardError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _pil_list(images) -> list[Image.Image]:
    return [Image.fromarray(a) for a in as_uint8_images(images)]


class ClipEncoder:
    """transformers CLIP: normalised image and text embeddings, computed in chunks of `batch_size`."""

    def __init__(self, model: str, processor: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        torch = _torch()
        from transformers import CLIPModel, CLIPProcessor

        self.device, self.dtype, self.batch_size = _device(device), _dtype(dtype), int(batch_size)
        try:
            self.processor = CLIPProcessor.from_pretrained(processor or model)
            self.model = CLIPModel.from_pretrained(model).eval().to(self.device, self.dtype)
        except (OSError, ValueError) as exc:
            raise RewardError(f"cannot load CLIP model {model!r} (processor {processor or model!r}): {exc}. "
                              "Pass a local folder, or download it first with `hf download ID`.") from None
        self.max_text = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        self.logit_scale = float(self.model.logit_scale.detach().float().exp().cpu())
        self._torch = torch

    @staticmethod
    def _pooled(out):
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        return out if isinstance(out, _torch().Tensor) else out.pooler_output

    def encode_images(self, images) -> Any:
        torch = self._torch
        pils = images if isinstance(images, list) else _pil_list(images)
        chunks = []
        with torch.no_grad():
            for i in range(0, len(pils), self.batch_size):
                px = self.processor.image_processor(images=pils[i:i + self.batch_size], return_tensors="pt")
                px = px["pixel_values"].to(self.device, self.dtype)
                chunks.append(self._pooled(self.model.get_image_features(pixel_values=px)).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()

    def encode_texts(self, prompts: list[str]) -> Any:
        torch = self._torch
        chunks = []
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch_size):
                tok = self.processor.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                               max_length=self.max_text, return_tensors="pt")
                tok = {k: v.to(self.device) for k, v in tok.items()}
                chunks.append(self._pooled(self.model.get_text_features(**tok)).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()


class OpenClipEncoder:
    """open_clip CLIP (optional extra `flowgrpo[openclip]`). `model` is an open_clip name such as
    `hf-hub:apple/DFN5B-CLIP-ViT-H-14-378`, or `ARCH:PRETRAINED` (e.g. `ViT-H-14:laion2b_s32b_b79k`
    or `ViT-H-14:/path/to/open_clip_model.safetensors`)."""

    def __init__(self, model: str, processor: str | None = None, device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        try:
            import open_clip
        except ModuleNotFoundError:
            raise RewardError("backend=open_clip needs open_clip: pip install 'flowgrpo[openclip]'") from None
        torch = _torch()
        self.device, self.dtype, self.batch_size = _device(device), _dtype(dtype), int(batch_size)
        try:
            if model.startswith("hf-hub:"):
                net, preprocess = open_clip.create_model_from_pretrained(model, device=self.device)
                tokenizer = open_clip.get_tokenizer(model)
            else:
                arch, _, pretrained = model.partition(":")
                net, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None,
                                                                           device=self.device)
                tokenizer = open_clip.get_tokenizer(arch)
        except (OSError, RuntimeError, ValueError) as exc:
            raise RewardError(f"cannot load open_clip model {model!r}: {exc}") from None
        self.model = net.eval().to(self.dtype)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.logit_scale = float(net.logit_scale.detach().float().exp().cpu())
        self._torch = torch

    def encode_images(self, images) -> Any:
        torch = self._torch
        pils = images if isinstance(images, list) else _pil_list(images)
        chunks = []
        with torch.no_grad():
            for i in range(0, len(pils), self.batch_size):
                px = torch.stack([self.preprocess(p) for p in pils[i:i + self.batch_size]])
                chunks.append(self.model.encode_image(px.to(self.device, self.dtype)).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()

    def encode_texts(self, prompts: list[str]) -> Any:
        torch = self._torch
        chunks = []
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch_size):
                tok = self.tokenizer(list(prompts[i:i + self.batch_size])).to(self.device)
                chunks.append(self.model.encode_text(tok).float())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1).cpu()


def make_encoder(backend: str = "transformers", **kwargs):
    if backend == "transformers":
        return ClipEncoder(**kwargs)
    if backend in ("open_clip", "openclip"):
        return OpenClipEncoder(**kwargs)
    raise RewardError(f"unknown CLIP backend {backend!r}; use transformers or open_clip")


# ----------------------------------------------------------------------------- text-image rewards


class ClipTextImageReward(Reward):
    """score = (exp(logit_scale) if use_logit_scale else 1) · cos(text, image) / divisor.
    component `clip_cosine` holds the raw cosine."""

    kind = "pointwise"

    def __init__(self, name: str, model: str, processor: str | None = None, use_logit_scale: bool = True,
                 divisor: float = 1.0, backend: str = "transformers", device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        self.name = name
        self.encoder = make_encoder(backend, model=model, processor=processor, device=device, dtype=dtype,
                                    batch_size=batch_size)
        self.scale = (self.encoder.logit_scale if use_logit_scale else 1.0) / float(divisor)

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        images = as_uint8_images(images)
        if len(prompts) != len(images):
            raise RewardError(f"got {len(images)} images but {len(prompts)} prompts")
        if len(images) == 0:
            return RewardOutput(np.zeros(0))
        cos = (self.encoder.encode_images(images) * self.encoder.encode_texts(list(prompts))).sum(-1)
        cos = cos.double().numpy()
        return RewardOutput(self.scale * cos, {"clip_cosine": cos})


@register("pickscore")
def _pickscore(model: str = PICKSCORE_MODEL, processor: str | None = PICKSCORE_PROCESSOR, **kw):
    return ClipTextImageReward("pickscore", model, processor, use_logit_scale=True, divisor=26.0, **kw)


@register("clipscore")
def _clipscore(model: str = CLIP_L14, processor: str | None = None, **kw):
    return ClipTextImageReward("clipscore", model, processor, use_logit_scale=True, divisor=30.0, **kw)


@register("clip")
def _clip(model: str = CLIP_L14, processor: str | None = None, logit_scale: bool = False, divisor: float = 1.0,
          **kw):
    return ClipTextImageReward("clip", model, processor, use_logit_scale=logit_scale, divisor=divisor, **kw)


# ----------------------------------------------------------------------------- aesthetic


def _aesthetic_mlp():
    nn = _torch().nn
    # Dropout slots keep the parameter names of the published checkpoint (layers.0, .2, .4, .6, .7).
    return nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def load_aesthetic_state(path: str | Path) -> dict:
    """MLP weights from .safetensors, or from the published .pth read with weights_only=True
    (tensors only: a pickle carrying code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise RewardError(f"aesthetic weights {path} not found; download {AESTHETIC_WEIGHTS_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = _torch().load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling refusal is the same user error
            raise RewardError(f"cannot read {path} as plain tensors ({exc}); convert it to .safetensors") from None
    return {k.removeprefix("layers."): v for k, v in dict(state).items()}


def convert_aesthetic_weights(src: str | Path, dst: str | Path) -> Path:
    """Write the published .pth MLP as .safetensors (read safely with weights_only=True)."""
    from safetensors.torch import save_file

    save_file({f"layers.{k}": v.contiguous() for k, v in load_aesthetic_state(src).items()}, str(dst))
    return Path(dst)


class AestheticReward(Reward):
    """LAION aesthetic predictor v2: MLP on the normalised CLIP-L/14 image embedding (~1-10 scale)."""

    kind = "pointwise"
    name = "aesthetic"

    def __init__(self, weights: str | None = None, model: str = CLIP_L14, processor: str | None = None,
                 backend: str = "transformers", device: str | None = None, dtype: str = "float32",
                 batch_size: int = 32):
        if not weights:
            raise RewardError(f"the aesthetic reward needs weights=PATH: {AESTHETIC_WEIGHTS_HINT}")
        state = load_aesthetic_state(weights)
        self.encoder = make_encoder(backend, model=model, processor=processor, device=device, dtype=dtype,
                                    batch_size=batch_size)
        self.mlp = _aesthetic_mlp()
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as exc:
            raise RewardError(f"{weights} is not a 768-1024-128-64-16-1 aesthetic MLP: {exc}") from None
        self.mlp.eval()

    def __call__(self, images, prompts=None, metadata=None, group_ids=None) -> RewardOutput:
        torch = _torch()
        images = as_uint8_images(images)
        if len(images) == 0:
            return RewardOutput(np.zeros(0))
        emb = self.encoder.encode_images(images)
        if emb.shape[-1] != 768:
            raise RewardError(f"the aesthetic MLP takes 768-d CLIP-L/14 embeddings; this model gives {emb.shape[-1]}")
        with torch.no_grad():
            scores = self.mlp(emb).squeeze(-1).double().numpy()
        return RewardOutput(scores)


@register("aesthetic")
def _aesthetic(**kw):
    return AestheticReward(**kw)


# ----------------------------------------------------------------------------- image similarity


class ImageSimilarityReward(Reward):
    """Mean (or max) cosine between an image's CLIP embedding and its references' embeddings.

    References per image: `metadata[i]["reference_images"]` (a path or a list of paths), else
    the entry for its prompt in `references` (a JSON file mapping prompt -> list of image
    paths, relative to the JSON's folder; the format `flowgrpo make-references` writes).
    Reference embeddings are cached by path.
    """

    kind = "pointwise"
    name = "image_similarity"

    def __init__(self, references: str | None = None, reduce: str = "mean", model: str = CLIP_L14,
                 processor: str | None = None, backend: str = "transformers", device: str | None = None,
                 dtype: str = "float32", batch_size: int = 32):
        if reduce not in ("mean", "max"):
            raise RewardError(f"reduce must be mean or max, got {reduce!r}")
        self.reduce = reduce
        self.by_prompt: dict[str, list[str]] = {}
        if references:
            ref_path = Path(references)
            try:
                table = json.loads(ref_path.read_text())
            except (OSError, ValueError) as exc:
                raise RewardError(f"cannot read references {references}: {exc}") from None
            if not isinstance(table, dict):
                raise RewardError(f"references {references} must map prompt -> list of image paths")
            for prompt, paths in table.items():
                paths = [paths] if isinstance(paths, str) else list(paths)
                self.by_prompt[prompt] = [str((ref_path.parent / p).resolve()) for p in paths]
        self.encoder = make_encoder(backend, model=model, processor=processor, device=device, dtype=dtype,
                                    batch_size=batch_size)
        self._cache: dict[str, Any] = {}

    def _refs(self, prompt: str, meta: dict | None) -> list[str]:
        if meta and meta.get("reference_images"):
            refs = meta["reference_images"]
            return [refs] if isinstance(refs, str) else list(refs)
        if prompt in self.by_prompt:
            return self.by_prompt[prompt]
        raise RewardError(f"no reference images for prompt {prompt[:80]!r}: give metadata['reference_images'] "
                          "or a references JSON that lists it")

    def _embed_refs(self, paths: list[str]):
        missing = [p for p in dict.fromkeys(paths) if p not in self._cache]
        if missing:
            try:
                pils = [Image.open(p).convert("RGB") for p in missing]
            except OSError as exc:
                raise RewardError(f"cannot read reference image: {exc}") from None
            for p, e in zip(missing, self.encoder.encode_images(pils)):
                self._cache[p] = e
        return _torch().stack([self._cache[p] for p in paths])

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        images = as_uint8_images(images)
        if len(images) == 0:
            return RewardOutput(np.zeros(0))
        emb = self.encoder.encode_images(images)
        scores = []
        for i, prompt in enumerate(prompts):
            sims = self._embed_refs(self._refs(prompt, metadata[i] if metadata else None)) @ emb[i]
            scores.append(float(sims.mean() if self.reduce == "mean" else sims.max()))
        return RewardOutput(np.asarray(scores))


@register("image_similarity")
def _image_similarity(**kw):
    return ImageSimilarityReward(**kw)


# ----------------------------------------------------------------------------- optional extras


class ImageRewardReward(Reward):
    """ImageReward-v1.0 (`pip install 'flowgrpo[imagereward]'`): its own BLIP-based scorer."""

    kind = "pointwise"
    name = "imagereward"

    def __init__(self, model: str = "ImageReward-v1.0", device: str | None = None):
        try:
            import ImageReward
        except ModuleNotFoundError:
            raise RewardError("the imagereward reward needs ImageReward: pip install 'flowgrpo[imagereward]' "
                              "(it pulls heavy dependencies; or serve it with `flowgrpo serve-reward imagereward` "
                              "in its own environment)") from None
        self.model = ImageReward.load(model, device=_device(device))

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        torch = _torch()
        with torch.no_grad():
            scores = [float(np.ravel(self.model.score(p, [im]))[0]) for p, im in zip(prompts, _pil_list(images))]
        return RewardOutput(np.asarray(scores))


class HpsV2Reward(Reward):
    """HPSv2.1 (`pip install 'flowgrpo[hps]'`): cos(text, image) of the HPS-tuned CLIP-H/14."""

    kind = "pointwise"
    name = "hpsv2"

    def __init__(self, version: str = "v2.1"):
        try:
            import hpsv2
        except ModuleNotFoundError:
            raise RewardError("the hpsv2 reward needs hpsv2: pip install 'flowgrpo[hps]' (it pulls heavy "
                              "dependencies; or serve it with `flowgrpo serve-reward hpsv2` in its own "
                              "environment)") from None
        self._hps, self.version = hpsv2, version

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        scores = [float(np.ravel(self._hps.score([im], p, hps_version=self.version))[0])
                  for p, im in zip(prompts, _pil_list(images))]
        return RewardOutput(np.asarray(scores))


@register("imagereward")
def _imagereward(**kw):
    return ImageRewardReward(**kw)


@register("hpsv2")
def _hpsv2(**kw):
    return HpsV2Reward(**kw)

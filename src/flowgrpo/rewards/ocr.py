"""OCR reward (Flow-GRPO's text-rendering reward).

The target is the text between the first pair of double quotes in the prompt (ASCII `"..."`,
or typographic `“...”` when the prompt has no ASCII pair); `metadata["ocr_text"]`, when given,
overrides it. Target and recognised text are lower-cased with all whitespace removed, then

    d = 0                                   if target occurs in the recognised text
    d = min(Levenshtein(recognised, target), len(target))   otherwise
    reward = 1 - d / len(target)            in [0, 1]

A prompt with no quoted text, or with an empty quoted text (`""`), has no target: the reward
is `no_target_score` (default 0.0) and the image is counted in `info["ocr_no_target"]`. (The
reference crashes on the first and divides by zero on the second.) An OCR engine that raises
on an image gives d = len(target), counted in `info["ocr_failures"]`.

Backends, all returning the recognised text of one RGB image:
- `rapidocr` (default): rapidocr-onnxruntime, PP-OCRv4 det/rec ONNX models shipped in the
  wheel, CPU, offline. The PaddleOCR family the reference uses.
- `tesseract`: Debian's `tesseract-ocr` binary through `pytesseract`.
- `paddleocr`: PaddleOCR itself (the reference backend; optional, for GPU machines).
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
from PIL import Image

from .base import Reward, RewardError, RewardOutput, as_uint8_images, register

log = logging.getLogger(__name__)

_ASCII_QUOTED = re.compile(r'"([^"]*)"')
_CURLY_QUOTED = re.compile(r"“([^”]*)”")
_SPACE = re.compile(r"\s+")


def ocr_target(prompt: str, metadata: dict | None = None) -> str | None:
    """The text the image should show, folded (lower case, no whitespace); None when there is none."""
    raw = None
    if metadata and isinstance(metadata.get("ocr_text"), str):
        raw = metadata["ocr_text"]
    else:
        m = _ASCII_QUOTED.search(prompt) or _CURLY_QUOTED.search(prompt)
        raw = m.group(1) if m else None
    if raw is None:
        return None
    folded = fold_text(raw)
    return folded or None


def fold_text(text: str) -> str:
    return _SPACE.sub("", text).lower()


def _levenshtein(a: str, b: str) -> int:
    try:
        from Levenshtein import distance
    except ModuleNotFoundError:  # rapidfuzz ships the same metric and is Levenshtein's own dependency
        try:
            from rapidfuzz.distance.Levenshtein import distance
        except ModuleNotFoundError:
            raise RewardError("the OCR reward needs Levenshtein: pip install 'flowgrpo[ocr]'") from None
    return int(distance(a, b))


def ocr_distance(target: str, recognised: str) -> int:
    """d of the docstring above, for already folded strings (target non-empty)."""
    if target in recognised:
        return 0
    return min(_levenshtein(recognised, target), len(target))


def ocr_score(target: str, recognised: str) -> float:
    """reward = 1 - d / len(target) on folded strings."""
    target, recognised = fold_text(target), fold_text(recognised)
    if not target:
        raise ValueError("empty OCR target")
    return 1.0 - ocr_distance(target, recognised) / len(target)


# ----------------------------------------------------------------------------- backends


class RapidOcrBackend:
    """PP-OCRv4 through onnxruntime. `min_confidence` drops recognised lines below it
    (PaddleOCR's default drop score, 0.5)."""

    name = "rapidocr"

    def __init__(self, min_confidence: float = 0.5, threads: int | None = None, **engine_kwargs):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ModuleNotFoundError:
            raise RewardError("the rapidocr backend needs rapidocr-onnxruntime: pip install 'flowgrpo[ocr]'") from None
        # onnxruntime ignores OMP_NUM_THREADS and takes every core; honour it so that OCR
        # shares a machine politely unless told otherwise.
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or -1
        self.min_confidence = min_confidence
        self.engine = RapidOCR(text_score=min_confidence, intra_op_num_threads=threads,
                               inter_op_num_threads=threads, **engine_kwargs)

    def __call__(self, image: np.ndarray) -> str:
        # A PIL image tells rapidocr the channels are RGB; a bare array would be read as BGR.
        result, _ = self.engine(Image.fromarray(image))
        if not result:
            return ""
        return "".join(text for _box, text, conf in result if float(conf) >= self.min_confidence)


class TesseractBackend:
    """Tesseract through pytesseract. `psm` 11 (sparse text) finds words scattered in a scene,
    which suits generated images better than the page-layout default (3)."""

    name = "tesseract"

    def __init__(self, psm: int = 11, lang: str = "eng", cmd: str | None = None, threads: int = 1):
        try:
            import pytesseract
        except ModuleNotFoundError:
            raise RewardError("the tesseract backend needs pytesseract: pip install 'flowgrpo[ocr]'") from None
        if cmd:
            pytesseract.pytesseract.tesseract_cmd = cmd
        try:
            pytesseract.get_tesseract_version()
        except pytesseract.TesseractNotFoundError:
            raise RewardError("the tesseract backend needs the tesseract binary: apt-get install tesseract-ocr "
                              "(or pass cmd=/path/to/tesseract)") from None
        # Tesseract's OpenMP threads fight each other when many images are read in parallel;
        # the subprocess inherits this limit (its documented knob).
        os.environ.setdefault("OMP_THREAD_LIMIT", str(threads))
        self._tess = pytesseract
        self.config = f"--psm {int(psm)}"
        self.lang = lang

    def __call__(self, image: np.ndarray) -> str:
        return self._tess.image_to_string(Image.fromarray(image), lang=self.lang, config=self.config)


class PaddleOcrBackend:
    """PaddleOCR itself, the reference backend (`pip install 'flowgrpo[paddleocr]'`)."""

    name = "paddleocr"

    def __init__(self, min_confidence: float = 0.0, lang: str = "en", **engine_kwargs):
        try:
            from paddleocr import PaddleOCR
        except ModuleNotFoundError:
            raise RewardError("the paddleocr backend needs PaddleOCR: pip install 'flowgrpo[paddleocr]' "
                              "(or use backend=rapidocr, the same PP-OCR models on onnxruntime)") from None
        self.min_confidence = min_confidence
        try:  # PaddleOCR 2.x
            self.engine = PaddleOCR(use_angle_cls=False, lang=lang, show_log=False, **engine_kwargs)
            self._v3 = False
        except (TypeError, ValueError):  # PaddleOCR 3.x dropped show_log/use_angle_cls
            self.engine = PaddleOCR(lang=lang, use_textline_orientation=False, **engine_kwargs)
            self._v3 = True

    def __call__(self, image: np.ndarray) -> str:
        if self._v3:
            out = self.engine.predict(image[..., ::-1].copy())  # 3.x reads arrays as BGR
            texts = []
            for page in out or []:
                for text, conf in zip(page["rec_texts"], page["rec_scores"]):
                    if conf > self.min_confidence:
                        texts.append(text)
            return "".join(texts)
        result = self.engine.ocr(image[..., ::-1].copy(), cls=False)
        lines = result[0] if result and result[0] else []
        return "".join(text for _box, (text, conf) in lines if conf > self.min_confidence)


BACKENDS = {"rapidocr": RapidOcrBackend, "tesseract": TesseractBackend, "paddleocr": PaddleOcrBackend}


def make_backend(name: str, **kwargs):
    if name not in BACKENDS:
        raise RewardError(f"unknown OCR backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name](**kwargs)


# ----------------------------------------------------------------------------- reward


class OcrReward(Reward):
    """Flow-GRPO's OCR reward (formula in the module docstring).

    components: `ocr_distance` (d, NaN without a target), `ocr_exact` (1 when the folded target
    occurs in the recognised text). info: `ocr_no_target`, `ocr_failures` (counts).
    `recognised` holds the last batch's recognised texts, for debugging.
    """

    kind = "pointwise"

    def __init__(self, backend="rapidocr", no_target_score: float = 0.0, **backend_kwargs):
        # A backend is a name from BACKENDS or any callable: uint8 HxWx3 RGB image -> text.
        self.backend = make_backend(backend, **backend_kwargs) if isinstance(backend, str) else backend
        self.no_target_score = float(no_target_score)
        self.name = f"ocr_{getattr(self.backend, 'name', 'custom')}"
        self.recognised: list[str] = []

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        images = as_uint8_images(images)
        if len(prompts) != len(images):
            raise RewardError(f"got {len(images)} images but {len(prompts)} prompts")
        n = len(images)
        scores = np.full(n, self.no_target_score, dtype=np.float64)
        dist = np.full(n, np.nan)
        exact = np.zeros(n)
        no_target = failures = 0
        self.recognised = []
        for i, (img, prompt) in enumerate(zip(images, prompts)):
            target = ocr_target(prompt, metadata[i] if metadata else None)
            if target is None:
                no_target += 1
                self.recognised.append("")
                continue
            try:
                text = fold_text(self.backend(img))
            except Exception as exc:  # one unreadable image must not kill a training step
                failures += 1
                log.warning("OCR backend %s failed on image %d: %s", self.backend.name, i, exc)
                text = ""
                d = len(target)
            else:
                d = ocr_distance(target, text)
            self.recognised.append(text)
            dist[i] = d
            exact[i] = float(target in text)
            scores[i] = 1.0 - d / len(target)
        return RewardOutput(scores, {"ocr_distance": dist, "ocr_exact": exact},
                            {"ocr_no_target": float(no_target), "ocr_failures": float(failures)})


@register("ocr")
def _ocr(backend: str = "rapidocr", **kwargs):
    return OcrReward(backend, **kwargs)

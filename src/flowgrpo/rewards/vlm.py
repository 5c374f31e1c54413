"""VLM pointwise score (UnifiedReward style): a vision-language model on an OpenAI-compatible
chat-completions server reads each image with its prompt and a rubric, and answers with a
line "Final Score: X", X in [1, 5]. reward = X / 5 (X / max_score in general).

Every request goes through `flowgrpo.chat.ChatClient` (concurrency limit, timeout, bounded
retries with backoff). An answer with no readable score in range, or a request that still
fails after its retries, is a counted failure (`info["vlm_unparsable"]`,
`info["vlm_request_failures"]`, logged) and gets the fallback score, never an exception:

- `fallback="group_mean"` (default): the mean reward of the scored images of the same prompt
  group (of the batch when no group ids are given; 0.0 when nothing in the batch was scored),
  so a failed image carries no advantage signal;
- a number: that reward (in reward units, i.e. already divided by max_score).

Serving UnifiedReward with vLLM (one GPU; raise --tensor-parallel-size for more):

    vllm serve CodeGoat24/UnifiedReward-qwen-7b --host 127.0.0.1 --port 8080 \\
        --served-model-name UnifiedReward --trust-remote-code --limit-mm-per-prompt.image 1

(older vLLM spells the last flag `--limit-mm-per-prompt image=1`), then
`make_reward("vlm_score", base_url="http://127.0.0.1:8080/v1", model="UnifiedReward")`.
The default rubric is our wording of the UnifiedReward pointwise task; pass `template_file`
(alias `rubric_file`) to use the exact template a checkpoint was trained with, read from the
user's own copy (see flowgrpo.prompt_templates; placeholder `{prompt}`, the caption). Note that
the official UnifiedReward pointwise template asks for three scores (alignment, coherence,
style) instead of one "Final Score": a template that does so needs a parser this reward does
not have.

Request options: `image_format` PNG (default) or JPEG at `image_quality` (default 95, the
official client's value), `max_tokens` (512; the official client asks for 4096),
`temperature` (0.0; None sends none, leaving the server's default, as the official client).
"""

from __future__ import annotations

import logging
import re

import numpy as np
from PIL import Image

from .. import prompt_templates
from ..chat import ChatClient, ChatConfig, image_part, text_part
from .base import Reward, RewardError, RewardOutput, as_uint8_images, register

log = logging.getLogger(__name__)

DEFAULT_RUBRIC = (
    "You are shown an image that was generated from a text caption. Judge it on two criteria.\n"
    "1. Alignment with the caption: are the objects, their number, attributes, relations and any "
    "written text the ones the caption asks for?\n"
    "2. Image quality: sharpness, detail, colour, composition and overall visual appeal.\n"
    "Weigh both, explain briefly, and end with one overall score from 1 (poor) to 5 (excellent) on "
    "a line of the form 'Final Score: X'.\n"
    "Caption: [{prompt}]"
)

_FINAL_SCORE = re.compile(r"final\s*score\s*[:：]?\s*[*_`]*\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_final_score(text: str | None, min_score: float = 1.0, max_score: float = 5.0) -> float | None:
    """The number after the last "Final Score:" (markdown emphasis tolerated), if in range."""
    if not text:
        return None
    matches = _FINAL_SCORE.findall(text)
    if not matches:
        return None
    value = float(matches[-1])
    return value if min_score <= value <= max_score else None


class VlmScoreReward(Reward):
    """components: `vlm_raw` (X, NaN when failed), `vlm_failed` (0/1).
    info: `vlm_requests` (HTTP attempts), `vlm_unparsable`, `vlm_request_failures`."""

    kind = "pointwise"
    name = "vlm_score"

    def __init__(self, base_url: str = "http://127.0.0.1:8080/v1", model: str = "UnifiedReward",
                 api_key: str | None = None, timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0,
                 concurrency: int = 16, max_tokens: int = 512, temperature: float | None = 0.0,
                 rubric: str | None = None, rubric_file: str | None = None, template_file: str | None = None,
                 template_syntax: str | None = None, image_format: str = "PNG", image_quality: int = 95,
                 max_side: int | None = None, min_score: float = 1.0, max_score: float = 5.0,
                 fallback: float | str = "group_mean"):
        if rubric_file and template_file and rubric_file != template_file:
            raise RewardError("give template_file or its alias rubric_file, not both")
        try:
            self.template = prompt_templates.resolve(template_file or rubric_file, rubric, DEFAULT_RUBRIC,
                                                     ("prompt",), syntax=template_syntax, what="rubric")
        except prompt_templates.TemplateError as exc:
            arg = "template_file" if template_file else "rubric_file" if rubric_file else "rubric"
            raise RewardError(f"{arg}: {exc}") from None
        self.rubric = self.template.text
        if not (isinstance(fallback, (int, float)) or fallback == "group_mean"):
            raise RewardError(f"fallback must be a number or 'group_mean', got {fallback!r}")
        if image_format.upper() not in ("PNG", "JPEG"):
            raise RewardError(f"image_format must be PNG or JPEG, got {image_format!r}")
        if not 1 <= int(image_quality) <= 100:
            raise RewardError(f"image_quality must be in 1..100, got {image_quality!r}")
        self.fallback = fallback
        self.min_score, self.max_score = float(min_score), float(max_score)
        self.image_format, self.max_side = image_format.upper(), max_side
        self.image_quality = int(image_quality) if self.image_format == "JPEG" else None
        self.client = ChatClient(ChatConfig(base_url=base_url, model=model, api_key=api_key, timeout=timeout,
                                            max_retries=max_retries, backoff=backoff, concurrency=concurrency,
                                            max_tokens=max_tokens, temperature=temperature))
        self.last_answers: list[str | None] = []

    def _message(self, image: np.ndarray, prompt: str) -> list[dict]:
        img = Image.fromarray(image)
        if self.max_side and max(img.size) > self.max_side:
            img.thumbnail((self.max_side, self.max_side), Image.LANCZOS)
        content = [image_part(img, self.image_format, self.image_quality), text_part(self.template.fill(prompt=prompt))]
        return [{"role": "user", "content": content}]

    def _fill(self, rewards: np.ndarray, failed: np.ndarray, group_ids) -> np.ndarray:
        if not failed.any():
            return rewards
        if self.fallback != "group_mean":
            return np.where(failed, float(self.fallback), rewards)
        out = rewards.copy()
        batch_mean = float(rewards[~failed].mean()) if (~failed).any() else 0.0
        groups = np.asarray(group_ids) if group_ids is not None else np.zeros(len(rewards), dtype=np.int64)
        for i in np.flatnonzero(failed):
            same = (groups == groups[i]) & ~failed
            out[i] = float(rewards[same].mean()) if same.any() else batch_mean
        return out

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        images = as_uint8_images(images)
        if len(prompts) != len(images):
            raise RewardError(f"got {len(images)} images but {len(prompts)} prompts")
        results = self.client.complete_many([self._message(img, p) for img, p in zip(images, prompts)])
        raw = np.full(len(images), np.nan)
        unparsable = request_failures = 0
        for i, res in enumerate(results):
            if not res.ok:
                request_failures += 1
                log.warning("VLM score request %d failed after %d attempts: %s", i, res.attempts, res.error)
                continue
            value = parse_final_score(res.text, self.min_score, self.max_score)
            if value is None:
                unparsable += 1
                log.warning("VLM score answer %d has no 'Final Score: X' in [%g, %g]: %r", i, self.min_score,
                            self.max_score, (res.text or "")[:200])
                continue
            raw[i] = value
        self.last_answers = [r.text for r in results]
        failed = np.isnan(raw)
        scores = self._fill(np.where(failed, 0.0, raw / self.max_score), failed, group_ids)
        info = {"vlm_requests": float(sum(r.attempts for r in results)), "vlm_unparsable": float(unparsable),
                "vlm_request_failures": float(request_failures)}
        return RewardOutput(scores, {"vlm_raw": raw, "vlm_failed": failed.astype(np.float64)}, info)


@register("vlm_score")
def _vlm_score(**kwargs):
    return VlmScoreReward(**kwargs)

"""A VLM as pairwise judge: UnifiedReward-Think (and -Flex) over an OpenAI-compatible API.

One chat request per ordered pair: a single user message holding Image 1 and Image 2 as
base64 data URLs, then the instruction with the caption. Two answer formats:

- ``format="think"`` (UnifiedReward-Think): the model scores both images 1-10 on semantic
  consistency, aesthetics and authenticity (plus up to two dimensions of its own), reasons
  inside ``<think>...</think>`` and gives the verdict inside ``<answer>...</answer>``, exactly
  "Image 1 is better" or "Image 2 is better".
- ``format="flex"`` (UnifiedReward-Flex): the model answers one JSON object with categories
  of self-chosen sub-dimensions (scores of the two images summing to 10) and a top-level
  ``"winner": "Image 1"`` or ``"Image 2"``.

Two parsers (``parser=``):

- ``"strict"`` (default): exactly one ``<answer>`` block (think) or one JSON object with a
  ``winner`` (flex) naming image 1 or 2, the verdict exactly (case, surrounding space and a
  final period ignored); anything else is garbage.
- ``"official"``: the official Pref-GRPO reward code's reading. Think: the FIRST
  ``<answer>...</answer>`` block (tags case-sensitive) and a case-sensitive substring test,
  "Image 1 is better" first, then "Image 2 is better". Flex: the whole answer as JSON, else
  the widest ``{...}`` span, and a ``winner`` naming exactly one of image/video 1 and 2.
  Where the official code silently scores an unreadable answer as a tie, this parser
  returns garbage, so the pair is re-asked and, if still unreadable, a counted failure
  (also scored as a tie, but visible in ``parse_failures``).

As an extension, the tie answers "Both images are equally good" (think) and ``"winner":
"Tie"`` (flex) parse as 0.5 with either parser: UnifiedReward models never write them,
`flowgrpo serve-judge` does for judges that tie.

Request options: ``image_format`` "PNG" (default, lossless) or "JPEG" with ``image_quality``
(default 95; the official client sends JPEG at quality 95), ``max_tokens`` (2048; the
official client asks for 4096), ``temperature`` (0.0; None sends none, so the server's
default applies, as in the official client), and the instruction: the built-in wording,
``instruction=`` (a string) or ``template_file=`` (a file, see flowgrpo.prompt_templates;
placeholder ``{prompt}``, the caption; ``template_syntax`` "plain" or "format").

Failures never raise. The shared ChatClient runs requests concurrently under a limit, each
with a timeout and bounded retries with exponential backoff (on timeouts, connection errors,
408/429/5xx). A request that still fails, or an answer that stays garbage after
``parse_retries`` re-asks (at ``retry_temperature``, since a greedy model repeats itself),
is a recorded failure, counted by the win-rate reward as a tie.

Serving the reference judges with vLLM (vLLM >= 0.11 for the Qwen3-VL models; since vLLM
0.10 ``--limit-mm-per-prompt`` takes JSON, older versions took ``image=2``)::

    vllm serve CodeGoat24/UnifiedReward-Think-qwen-7b --served-model-name UnifiedReward \\
        --limit-mm-per-prompt '{"image": 2}' --host 127.0.0.1 --port 8080 \\
        --tensor-parallel-size 1 --gpu-memory-utilization 0.9 [--api-key TOKEN]
    # newer judges, same flags: CodeGoat24/UnifiedReward-Think-qwen3vl-8b (format "think"),
    # CodeGoat24/UnifiedReward-Flex-qwen3vl-8b (format "flex")

then ``make_reward("pref_winrate", judge="vlm", judge_args={"base_url":
"http://127.0.0.1:8080/v1", "model": "UnifiedReward"})``. The instructions below are this
project's wording of the published formats; the judges were fine-tuned on the official
wording, which a user reads from their own checkout with ``template_file`` (Pref-GRPO:
``fastvideo/rewards/templates.py``, functions ``get_unifiedreward_think_image_template`` and
``get_unifiedreward_flex_image_template``; both are filled with str.format, so use
``template_syntax="format"`` for the Flex one, whose example JSON has doubled braces).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import replace

import numpy as np

from .. import prompt_templates
from ..chat import ChatClient, ChatConfig, image_to_data_url, text_part
from .base import RewardError, as_uint8_images
from .pairwise import Judge, JudgeResult, register_judge

log = logging.getLogger(__name__)

THINK_INSTRUCTION = """You are judging two images generated from the same caption. The first image \
above is Image 1, the second is Image 2.

The caption is: 「{prompt}」

Compare the two images on three core dimensions:
1. Semantic consistency: how faithfully the image shows what the caption describes.
2. Aesthetics: composition, use of colour, overall visual appeal.
3. Authenticity: realism, physical plausibility and fine detail.
If the caption calls for it you may add up to two further dimensions of your choice.

For every dimension give each image a score from 1 to 10 and a short reason, one block per dimension:
N. Dimension name:
    Image 1 (x/10) - reason;
    Image 2 (y/10) - reason
Then add up each image's scores, showing the sums:
Total score:
Image 1: a+b+c=total
Image 2: d+e+f=total

Write all reasoning and scores inside <think> and </think>. After </think>, write the verdict inside \
<answer> and </answer>: exactly "Image 1 is better" or "Image 2 is better", nothing else."""

FLEX_INSTRUCTION = """You are judging two images generated from the same prompt: the first image \
above is Image 1, the second is Image 2.

Prompt: [{prompt}]

Compare them hierarchically. Always cover three categories: A. Semantic alignment (subjects, \
attributes, counts, relations asked for by the prompt), B. Image quality and realism, C. Aesthetics \
(composition, colour, style); add a category D if the prompt has traits that need one. Within each \
category choose 3 to 5 sub-dimensions that best separate the two images, and score both images on \
each so that the two scores add up to exactly 10. Ground every reason in visible evidence.

Answer with one JSON object and nothing else:
{"prompt": "...", "categories": [{"name": "...", "dims": [{"name": "...", "reason_1": "...", \
"reason_2": "...", "score_1": 6, "score_2": 4}], "cat_reason": "...", "cat_winner": "Image 1"}], \
"reason": "...", "winner": "Image 1"}
where each "cat_winner" and the final "winner" is "Image 1" or "Image 2"."""

INSTRUCTIONS = {"think": THINK_INSTRUCTION, "flex": FLEX_INSTRUCTION}
TIE_ANSWER = "Both images are equally good"

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_THINK_VERDICTS = {"image 1 is better": 1.0, "image 2 is better": 0.0, TIE_ANSWER.lower(): 0.5}
_FLEX_WINNER = re.compile(r"image\s*([12])(?:\s+is\s+better)?\.?", re.I)


def parse_think(text: str | None) -> float | None:
    """P(Image 1 better) from a UnifiedReward-Think answer, or None if it is not exactly one
    <answer> block holding one of the verdicts (case and surrounding space/period ignored)."""
    if not text:
        return None
    answers = _ANSWER.findall(text)
    if len(answers) != 1:
        return None
    verdict = " ".join(answers[0].split()).rstrip(".").lower()
    return _THINK_VERDICTS.get(verdict)


def parse_flex(text: str | None) -> float | None:
    """P(Image 1 better) from a UnifiedReward-Flex JSON answer (code fences allowed), or None."""
    if not text:
        return None
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    winner = data.get("winner") if isinstance(data, dict) else None
    if not isinstance(winner, str):
        return None
    winner = winner.strip()
    if winner.lower() == "tie":
        return 0.5
    m = _FLEX_WINNER.fullmatch(winner)
    return None if m is None else (1.0 if m.group(1) == "1" else 0.0)


_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)  # case-sensitive, as the official
_OFFICIAL_THINK = (("Image 1 is better", 1.0), ("Image 2 is better", 0.0), (TIE_ANSWER, 0.5))


def parse_think_official(text: str | None) -> float | None:
    """The official reading of a Think answer: the FIRST <answer> block, then a
    case-sensitive substring test ("Image 1 is better" before "Image 2 is better"); None
    when there is no block or neither verdict is in it (the official code calls that a tie)."""
    if not text:
        return None
    m = _FIRST_ANSWER.search(text)
    if m is None:
        return None
    verdict = m.group(1).strip()
    for needle, p in _OFFICIAL_THINK:
        if needle in verdict:
            return p
    return None


_WIDEST_OBJECT = re.compile(r"\{.*\}", re.S)
_SIDE = {1: re.compile(r"\b(?:video|image)\s*1\b"), 2: re.compile(r"\b(?:video|image)\s*2\b")}


def parse_flex_official(text: str | None) -> float | None:
    """The official reading of a Flex answer: the whole text as JSON, else the widest
    {...} span; the winner names exactly one of image (or video) 1 and 2. None otherwise
    (the official code calls that a tie); "Tie" is the tie extension."""
    if not text:
        return None
    data = None
    try:
        data = json.loads(text.strip())
    except json.JSONDecodeError:
        m = _WIDEST_OBJECT.search(text)
        if m:
            try:
                data = json.loads(m.group(0))
            except json.JSONDecodeError:
                data = None
    if not isinstance(data, dict):
        return None
    winner = str(data.get("winner", "")).lower()
    if winner.strip() == "tie":
        return 0.5
    first, second = _SIDE[1].search(winner), _SIDE[2].search(winner)
    if first and not second:
        return 1.0
    if second and not first:
        return 0.0
    return None


PARSERS = {("think", "strict"): parse_think, ("flex", "strict"): parse_flex,
           ("think", "official"): parse_think_official, ("flex", "official"): parse_flex_official}
PARSER_NAMES = ("strict", "official")

_CAPTION_PATTERNS = (
    ("think", re.compile(r"「(.*)」", re.S)),
    ("flex", re.compile(r"^\W*Prompt\W*\[(.*)\]\s*$", re.M)),
)


def extract_caption(text: str) -> tuple[str, str] | None:
    """(caption, format) from a pairwise instruction: the caption between 「 」 (Think
    templates) or on a line `Prompt: [...]` (Flex templates); None if neither is there."""
    for fmt, pattern in _CAPTION_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1).strip(), fmt
    return None


class VLMJudge(Judge):
    """Pairwise judge backed by a served VLM; see the module docstring.

    info: requests, http_failures, parse_failures (still garbage after re-asks), reasks,
    retries (HTTP-level repeats). `last_failures` keeps a short reason per failed pair of the
    latest call, for debugging a judge that suddenly fails.
    """

    hard = True
    concurrent_calls = 4  # every judge() call runs its own event loop and HTTP client

    def __init__(self, base_url: str = "http://127.0.0.1:8080/v1", model: str = "UnifiedReward",
                 format: str = "think", instruction: str | None = None, api_key: str | None = None,
                 api_key_env: str | None = None, timeout: float = 300.0, max_retries: int = 3,
                 backoff: float = 1.0, concurrency: int = 32, max_tokens: int = 2048,
                 temperature: float | None = 0.0, parse_retries: int = 2, retry_temperature: float | None = 0.7,
                 image_format: str = "PNG", image_quality: int = 95, parser: str = "strict",
                 template_file: str | None = None, template_syntax: str | None = None,
                 extra_body: dict | None = None):
        if format not in INSTRUCTIONS:
            raise RewardError(f"vlm judge format must be one of {sorted(INSTRUCTIONS)}, got {format!r}")
        if parser not in PARSER_NAMES:
            raise RewardError(f"vlm judge parser must be one of {list(PARSER_NAMES)}, got {parser!r}")
        if image_format.upper() not in ("PNG", "JPEG"):
            raise RewardError(f"vlm judge image_format must be PNG or JPEG, got {image_format!r}")
        if not 1 <= int(image_quality) <= 100:
            raise RewardError(f"vlm judge image_quality must be in 1..100, got {image_quality!r}")
        if int(max_tokens) < 1:
            raise RewardError(f"vlm judge max_tokens must be >= 1, got {max_tokens!r}")
        if parse_retries < 0 or max_retries < 0:
            raise RewardError("vlm judge parse_retries and max_retries must be >= 0")
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise RewardError(f"vlm judge: environment variable {api_key_env} (api_key_env) is not set")
        try:
            self.template = prompt_templates.resolve(template_file, instruction, INSTRUCTIONS[format], ("prompt",),
                                                     syntax=template_syntax, what="vlm judge instruction")
        except prompt_templates.TemplateError as exc:
            raise RewardError(str(exc)) from None
        self.format = format
        self.instruction = self.template.text
        self.parser = parser
        self.parse = PARSERS[(format, parser)]
        self.parse_retries = int(parse_retries)
        self.image_format = image_format.upper()
        self.image_quality = int(image_quality)
        # Only JPEG takes a quality; PNG is encoded exactly as before.
        self._encode_kwargs = {"quality": self.image_quality} if self.image_format == "JPEG" else {}
        self.config = ChatConfig(base_url=base_url, model=model, api_key=api_key, timeout=timeout,
                                 max_retries=max_retries, backoff=backoff, concurrency=concurrency,
                                 max_tokens=int(max_tokens), temperature=temperature,
                                 extra_body=dict(extra_body or {}))
        self.client = ChatClient(self.config)
        self.retry_client = ChatClient(replace(self.config, temperature=retry_temperature))
        self.name = f"vlm_{format}({model})"
        self.last_failures: list[str] = []

    def messages(self, prompt: str, image_a, image_b, _urls: dict | None = None) -> list[dict]:
        """The request for one ordered pair. `_urls` caches encodings within a call: each image
        of a group appears in G - 1 pairs, and encoding a large PNG costs more than hashing it."""
        parts = []
        for img in (np.asarray(image_a), np.asarray(image_b)):
            key = hashlib.blake2b(img.tobytes(), digest_size=16).hexdigest() + str(img.shape)
            url = _urls.get(key) if _urls is not None else None
            if url is None:
                url = image_to_data_url(img, self.image_format, **self._encode_kwargs)
                if _urls is not None:
                    _urls[key] = url
            parts.append({"type": "image_url", "image_url": {"url": url}})
        text = self.template.fill(prompt=prompt)
        return [{"role": "user", "content": [*parts, text_part(text)]}]

    def judge(self, prompts, images_a, images_b, metadata=None) -> JudgeResult:
        n = len(prompts)
        images_a, images_b = as_uint8_images(images_a), as_uint8_images(images_b)
        urls: dict[str, str] = {}
        convs = [self.messages(p, a, b, urls) for p, a, b in zip(prompts, images_a, images_b)]
        probs = np.full(n, 0.5)
        failed = np.ones(n, dtype=bool)
        reasons: dict[int, str] = {}
        counts = {"requests": 0, "http_failures": 0, "parse_failures": 0, "reasks": 0, "retries": 0}

        todo = list(range(n))
        for round_ in range(self.parse_retries + 1):
            if not todo:
                break
            client = self.client if round_ == 0 else self.retry_client
            counts["reasks"] += len(todo) if round_ else 0
            results = client.complete_many([convs[i] for i in todo])
            garbage = []
            for i, res in zip(todo, results):
                counts["requests"] += 1
                counts["retries"] += res.attempts - 1
                if not res.ok:
                    counts["http_failures"] += 1
                    reasons[i] = f"request failed: {res.error}"
                    continue
                p = self.parse(res.text)
                if p is None:
                    garbage.append(i)
                    reasons[i] = f"unparsable answer: {res.text[-160:]!r}"
                    continue
                probs[i], failed[i] = p, False
                reasons.pop(i, None)
            todo = garbage
        counts["parse_failures"] = len(todo)

        self.last_failures = [f"pair {i}: {reasons[i]}" for i in sorted(reasons)]
        if self.last_failures:
            log.warning("%s: %d of %d pairs failed (counted as ties); first: %s", self.name,
                        len(self.last_failures), n, self.last_failures[0])
        return JudgeResult(probs, failed, {k: float(v) for k, v in counts.items()})


@register_judge("vlm")
def _vlm_judge(**kwargs):
    return VLMJudge(**kwargs)

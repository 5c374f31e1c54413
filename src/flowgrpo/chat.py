"""A small client for OpenAI-compatible chat-completions servers (vLLM, sglang, Gemini's
OpenAI endpoint, `flowgrpo serve-judge`), shared by VLM rewards, pairwise judges and
benchmark judges.

Why not one request at a time with `openai`: a GRPO step asks hundreds of questions, so
requests run concurrently under a limit, each with a timeout and bounded retries with
exponential backoff; a request that still fails comes back as a failure record, never as an
exception, so one bad answer cannot kill a training step.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class ChatConfig:
    base_url: str = "http://127.0.0.1:8000/v1"  # the server's OpenAI-compatible root
    model: str = "default"  # the served model name (vllm serve ... --served-model-name)
    api_key: str | None = None  # sent as a bearer token when set
    timeout: float = 120.0  # seconds per request
    max_retries: int = 3  # after the first attempt
    backoff: float = 1.0  # seconds, doubled per retry, with jitter
    concurrency: int = 16  # requests in flight at once
    max_tokens: int = 1024
    temperature: float | None = 0.0  # None: not sent, the server's default applies (as the official clients)
    extra_body: dict = field(default_factory=dict)  # passed through (e.g. top_p, seed)


@dataclass
class ChatResult:
    text: str | None  # the assistant message, or None after a failure
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.text is not None


def image_to_data_url(image, fmt: str = "PNG", quality: int | None = None) -> str:
    """uint8 HxWx3 array or PIL image -> data URL for an `image_url` content part.
    `quality` is the JPEG quality (1-100; None: Pillow's default, 75); PNG ignores it."""
    if not hasattr(image, "save"):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    jpeg = fmt.upper() in ("JPEG", "JPG")
    kwargs = {"quality": int(quality)} if jpeg and quality is not None else {}
    image.convert("RGB").save(buf, format="JPEG" if jpeg else fmt, **kwargs)
    mime = "image/jpeg" if jpeg else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(image, fmt: str = "PNG", quality: int | None = None) -> dict:
    return {"type": "image_url", "image_url": {"url": image_to_data_url(image, fmt, quality)}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


class ChatClient:
    def __init__(self, config: ChatConfig):
        self.config = config

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.config.api_key:
            h["Authorization"] = f"Bearer {self.config.api_key}"
        return h

    async def _one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, messages: list[dict]) -> ChatResult:
        cfg = self.config
        body = {"model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens, **cfg.extra_body}
        if cfg.temperature is not None:
            body.setdefault("temperature", cfg.temperature)
        url = cfg.base_url.rstrip("/") + "/chat/completions"
        error = "no attempt"
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(cfg.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                async with sem:
                    resp = await client.post(url, json=body, headers=self._headers(), timeout=cfg.timeout)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code in RETRY_STATUS:
                error = f"HTTP {resp.status_code}"
                continue
            if resp.status_code != 200:
                # 4xx other than the retryable ones: the request itself is wrong; retrying won't help
                return ChatResult(None, f"HTTP {resp.status_code}: {resp.text[:200]}", attempt + 1)
            try:
                text = resp.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                error = f"malformed response: {resp.text[:200]}"
                continue
            if not isinstance(text, str):
                error = "response content is not text"
                continue
            return ChatResult(text, None, attempt + 1)
        return ChatResult(None, error, cfg.max_retries + 1)

    async def acomplete_many(self, conversations: list[list[dict]]) -> list[ChatResult]:
        sem = asyncio.Semaphore(self.config.concurrency)
        async with httpx.AsyncClient() as client:
            return list(await asyncio.gather(*(self._one(client, sem, m) for m in conversations)))

    def complete_many(self, conversations: list[list[dict]]) -> list[ChatResult]:
        """Blocking: run every conversation concurrently, results in input order."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.acomplete_many(conversations))
        # Called from inside an event loop (e.g. a notebook): run on a private loop in a thread.
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.acomplete_many(conversations)).result()

    def complete(self, messages: list[dict]) -> ChatResult:
        return self.complete_many([messages])[0]

"""Client for the reward server (`make_reward("remote:http://127.0.0.1:8100")`).

Images go out as base64 PNG in JSON (protocol in server.py). Each request has a connect
and a read timeout; transport errors, timeouts and 408/425/429/5xx answers are retried with
exponential backoff (capped, with jitter), so a training run rides through a reward server
restart. Other 4xx answers are the request's fault and raise `RewardError` at once with the
server's explanation. The client learns the served reward's kind and batch limit from
/health, and splits large batches (whole prompt groups at a time for pairwise rewards).

info adds `remote_requests`, `remote_retries`, `remote_seconds`; the server's own info
counters are summed over the requests of a call.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

import numpy as np

from .base import Reward, RewardError, RewardOutput, as_uint8_images, register
from .server import PROTOCOL_VERSION, TOKEN_ENV, encode_png_base64

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def _normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url:
        raise RewardError("remote reward needs a URL, e.g. remote:http://127.0.0.1:8100")
    if "://" not in url:
        url = "http://" + url
    return url


def _nan_list(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)


class RemoteReward(Reward):
    concurrent_calls = 4  # httpx.Client is thread-safe; the server queues what it cannot run at once
    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, connect_timeout: float = 5.0,
                 max_retries: int = 8, backoff: float = 0.5, max_backoff: float = 30.0, batch_size: int | None = None,
                 probe: bool = True):
        import httpx

        self.url = _normalise_url(url)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.max_retries, self.backoff, self.max_backoff = int(max_retries), float(backoff), float(max_backoff)
        self.batch_size = batch_size
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._client = httpx.Client(timeout=self._timeout)
        self._httpx = httpx
        self.server: dict[str, Any] = {}
        self.name = f"remote:{self.url}"
        if probe:
            self.refresh()

    # -- transport

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _sleep(self, attempt: int) -> None:
        time.sleep(min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random()))

    def _request(self, method: str, path: str, stats: dict, **kwargs) -> Any:
        httpx = self._httpx
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                stats["remote_retries"] += 1
                self._sleep(attempt - 1)
            stats["remote_requests"] += 1
            try:
                resp = self._client.request(method, self.url + path, headers=self._headers(), **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server may be restarting
                last = f"{type(exc).__name__}: {exc}"
                log.warning("reward server %s: %s (attempt %d of %d)", self.url, last, attempt + 1,
                            self.max_retries + 1)
                continue
            if resp.status_code in RETRY_STATUS:
                last = f"HTTP {resp.status_code}: {_detail(resp)}"
                log.warning("reward server %s: %s (attempt %d of %d)", self.url, last, attempt + 1,
                            self.max_retries + 1)
                continue
            if resp.status_code in (401, 403):
                raise RewardError(f"reward server {self.url} refused the token ({_detail(resp)}); pass token=... or "
                                  f"set ${TOKEN_ENV} to the server's token")
            if resp.status_code != 200:
                raise RewardError(f"reward server {self.url} rejected the request (HTTP {resp.status_code}): "
                                  f"{_detail(resp)}")
            try:
                return resp.json()
            except ValueError:
                last = f"answer is not JSON: {resp.text[:200]!r}"
                continue
        raise RewardError(f"reward server {self.url} failed after {self.max_retries + 1} attempts ({last}); "
                          "is `flowgrpo serve-reward` running there?")

    def refresh(self) -> dict:
        """Ask /health for the served reward's kind and limits."""
        stats = {"remote_requests": 0, "remote_retries": 0}
        health = self._request("GET", "/health", stats)
        if not isinstance(health, dict) or health.get("protocol") != PROTOCOL_VERSION:
            raise RewardError(f"{self.url} does not speak reward-server protocol {PROTOCOL_VERSION}: /health said "
                              f"{str(health)[:200]}")
        self.server = health
        self.name = f"remote:{health.get('reward', 'reward')}"
        self.needs_groups = bool(health.get("needs_groups", False))
        # An adversarial reward's discriminator cannot be trained through this client: it scores only.
        self.kind = "pairwise" if health.get("kind") == "pairwise" else "pointwise"
        return health

    # -- scoring

    def _chunks(self, n: int, group_ids: np.ndarray | None) -> list[np.ndarray]:
        limit = min(x for x in (self.batch_size, self.server.get("max_batch"), n) if x)
        if not self.needs_groups or group_ids is None:
            return [np.arange(i, min(n, i + limit)) for i in range(0, n, limit)]
        chunks, cur = [], []
        for g in dict.fromkeys(group_ids.tolist()):  # whole groups, in order of appearance
            members = np.flatnonzero(group_ids == g).tolist()
            if len(members) > limit:
                raise RewardError(f"prompt group {g} has {len(members)} images, more than the server's batch "
                                  f"limit {limit}; raise --max-batch on the server")
            if cur and len(cur) + len(members) > limit:
                chunks.append(np.asarray(cur))
                cur = []
            cur += members
        if cur:
            chunks.append(np.asarray(cur))
        return chunks

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        t0 = time.perf_counter()
        images = as_uint8_images(images)
        n = len(images)
        if len(prompts) != n:
            raise RewardError(f"got {n} images but {len(prompts)} prompts")
        if not self.server:
            self.refresh()
        gids = None if group_ids is None else np.asarray(group_ids)
        encoded = [encode_png_base64(im) for im in images]
        scores = np.full(n, np.nan)
        components: dict[str, np.ndarray] = {}
        info: dict[str, float] = {}
        stats = {"remote_requests": 0, "remote_retries": 0}
        for idx in self._chunks(n, gids) if n else []:
            body = {"images": [encoded[i] for i in idx], "prompts": [prompts[i] for i in idx],
                    "metadata": None if metadata is None else [metadata[i] for i in idx],
                    "group_ids": None if gids is None else [int(gids[i]) for i in idx]}
            ans = self._request("POST", "/score", stats, json=body)
            got = ans.get("scores") if isinstance(ans, dict) else None
            if not isinstance(got, list) or len(got) != len(idx):
                raise RewardError(f"reward server {self.url} answered {len(got) if isinstance(got, list) else 'no'} "
                                  f"scores for {len(idx)} images")
            scores[idx] = _nan_list(got)
            for key, vals in (ans.get("components") or {}).items():
                if isinstance(vals, list) and len(vals) == len(idx):
                    components.setdefault(key, np.full(n, np.nan))[idx] = _nan_list(vals)
            for key, val in (ans.get("info") or {}).items():
                if isinstance(val, (int, float)):
                    info[key] = info.get(key, 0.0) + float(val)
        info.update({k: float(v) for k, v in stats.items()})
        info["remote_seconds"] = time.perf_counter() - t0
        return RewardOutput(scores, components, info)

    def close(self) -> None:
        self._client.close()


def _detail(resp) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and "detail" in body:
            return str(body["detail"])[:500]
    except ValueError:
        pass
    return resp.text[:200]


@register("remote")
def _remote(url: str, **kwargs):
    return RemoteReward(url, **kwargs)

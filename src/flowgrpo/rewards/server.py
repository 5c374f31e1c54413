"""The reward server: any registered reward over HTTP, so reward models with conflicting
dependencies live in their own environment (`flowgrpo serve-reward NAME`).

Protocol (version 1). Nothing is pickled; bodies are JSON or multipart.

    GET  /health -> {"status": "ok", "protocol": 1, "reward", "kind", "needs_groups",
                     "max_batch", "max_image_side", "max_body_bytes", "calls", "busy"}
    POST /score  (JSON)      {"images": [base64 PNG | JPEG | WebP, data: URLs accepted],
                              "prompts": [str], "metadata": [object | null] | null,
                              "group_ids": [int] | null}
                 (multipart) files `images` (repeated), fields `prompts` (repeated, one per
                              image), optional fields `metadata` and `group_ids` (JSON arrays)
              -> 200 {"reward", "scores": [float | null], "components": {name: [float | null]},
                      "info": {name: float | null}, "elapsed_s"}   (null = NaN or inf)
    Errors are JSON {"detail": "..."}: 400 malformed body / bad base64 / not an image,
    401 missing or wrong bearer token, 413 body, batch or image too large, 415 other content
    types, 422 well-formed but inconsistent (lengths, sizes, metadata the reward rejects),
    500 only when the reward itself fails on valid input; the worker keeps serving.

One reward call runs at a time, in a worker thread, so /health answers while it scores.
Binds 127.0.0.1 unless told; with --host elsewhere, set a token.

For measurement only, `--bench-latency S` makes every call take S seconds more per image
(serially, as a reward model on one device would): a cheap reward then stands for a slow
one in `flowgrpo bench --remote-reward` (docs/performance.md).
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoint annotations at runtime.
import base64
import binascii
import hmac
import io
import json
import logging
import math
import os
import threading
import time
from typing import Any

import numpy as np

from .base import Reward, RewardError, make_reward

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
TOKEN_ENV = "FLOWGRPO_REWARD_TOKEN"
DEFAULT_PORT = 8100
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


class RequestProblem(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _finite_or_none(values) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in np.asarray(values, dtype=np.float64).ravel()]


def decode_image(data: bytes, index: int, max_side: int) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> uint8 (H, W, 3). The size is checked from the header, before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise RequestProblem(413, f"images[{index}] declares more pixels than Pillow will decode") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestProblem(400, f"images[{index}] is not a PNG, JPEG or WebP image") from None
    w, h = img.size
    if max(w, h) > max_side:
        raise RequestProblem(413, f"images[{index}] is {w}x{h}, larger than the server's max image side {max_side}; "
                                  "downscale it or restart the server with a larger --max-image-side")
    try:
        return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise RequestProblem(400, f"images[{index}] is a corrupt or truncated image: {exc}") from None


def decode_base64_image(text: Any, index: int, max_side: int) -> np.ndarray:
    if not isinstance(text, str):
        raise RequestProblem(400, f"images[{index}] must be a base64 string")
    text = text.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestProblem(400, f"images[{index}] is not valid base64") from None
    return decode_image(data, index, max_side)


def encode_png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _check_lists(prompts, metadata, group_ids, n: int) -> None:
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestProblem(422, "prompts must be a list of strings")
    if len(prompts) != n:
        raise RequestProblem(422, f"got {n} images but {len(prompts)} prompts; send one prompt per image")
    if metadata is not None:
        if not isinstance(metadata, list) or not all(m is None or isinstance(m, dict) for m in metadata):
            raise RequestProblem(422, "metadata must be a list of objects (or null entries)")
        if len(metadata) != n:
            raise RequestProblem(422, f"got {n} images but {len(metadata)} metadata entries")
    if group_ids is not None:
        if not isinstance(group_ids, list) or not all(isinstance(g, int) and not isinstance(g, bool)
                                                      for g in group_ids):
            raise RequestProblem(422, "group_ids must be a list of integers")
        if len(group_ids) != n:
            raise RequestProblem(422, f"got {n} images but {len(group_ids)} group ids")


def _stack(images: list[np.ndarray]) -> np.ndarray:
    if not images:
        return np.zeros((0, 1, 1, 3), np.uint8)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        sizes = ", ".join(sorted(f"{s[1]}x{s[0]}" for s in shapes))
        raise RequestProblem(422, f"all images in one request must have one size; got {sizes}")
    return np.stack(images)


class DelayedReward(Reward):
    """`reward` plus a fixed latency per image (serve-reward --bench-latency): a stand-in for a
    slow reward model when measuring how much of the reward time training hides."""

    def __init__(self, reward: Reward, seconds_per_image: float):
        if not seconds_per_image >= 0:
            raise RewardError(f"--bench-latency must be >= 0 seconds an image, got {seconds_per_image}")
        self.reward, self.seconds_per_image = reward, float(seconds_per_image)
        self.name, self.kind, self.needs_groups = reward.name, reward.kind, reward.needs_groups

    def __call__(self, images, prompts, metadata=None, group_ids=None):
        time.sleep(self.seconds_per_image * len(images))
        return self.reward(images, prompts, metadata, group_ids)


class RewardService:
    """Validation and scoring, independent of the web framework (easy to test and to reuse)."""

    def __init__(self, reward: Reward, token: str | None = None, max_batch: int = 64, max_image_side: int = 2048,
                 max_body_bytes: int = 256 * 2**20):
        self.reward, self.token = reward, token or None
        self.max_batch, self.max_image_side, self.max_body_bytes = int(max_batch), int(max_image_side), int(max_body_bytes)
        self.lock = threading.Lock()
        self.calls = 0
        self.busy = False

    def health(self) -> dict:
        return {"status": "ok", "protocol": PROTOCOL_VERSION, "reward": getattr(self.reward, "name", "reward"),
                "kind": getattr(self.reward, "kind", "pointwise"),
                "needs_groups": bool(getattr(self.reward, "needs_groups", False)),
                "max_batch": self.max_batch, "max_image_side": self.max_image_side,
                "max_body_bytes": self.max_body_bytes, "calls": self.calls, "busy": self.busy}

    def check_token(self, authorization: str | None) -> None:
        if not self.token:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise RequestProblem(401, "missing or wrong bearer token: give the client the server's token "
                                      f"(token=... or ${TOKEN_ENV})")

    def check_count(self, n: int) -> None:
        if n > self.max_batch:
            raise RequestProblem(413, f"batch of {n} images exceeds the server's max batch {self.max_batch}; "
                                      "send smaller batches or restart the server with a larger --max-batch")

    def parse_json(self, body: bytes) -> tuple[np.ndarray, list, list | None, list | None]:
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestProblem(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(req, dict) or "images" not in req or "prompts" not in req:
            raise RequestProblem(400, 'request body must be a JSON object with "images" and "prompts"')
        images = req["images"]
        if not isinstance(images, list):
            raise RequestProblem(400, "images must be a list of base64 strings")
        self.check_count(len(images))
        prompts, metadata, group_ids = req["prompts"], req.get("metadata"), req.get("group_ids")
        _check_lists(prompts, metadata, group_ids, len(images))
        arrays = [decode_base64_image(s, i, self.max_image_side) for i, s in enumerate(images)]
        return _stack(arrays), prompts, metadata, group_ids

    def parse_form(self, files: list[bytes], prompts: list[str], metadata: str | None,
                   group_ids: str | None) -> tuple[np.ndarray, list, list | None, list | None]:
        self.check_count(len(files))
        try:
            metadata = json.loads(metadata) if metadata else None
            group_ids = json.loads(group_ids) if group_ids else None
        except ValueError as exc:
            raise RequestProblem(400, f"metadata and group_ids fields must be JSON arrays: {exc}") from None
        _check_lists(prompts, metadata, group_ids, len(files))
        arrays = [decode_image(data, i, self.max_image_side) for i, data in enumerate(files)]
        return _stack(arrays), prompts, metadata, group_ids

    def score(self, images: np.ndarray, prompts: list, metadata, group_ids) -> dict:
        name = getattr(self.reward, "name", "reward")
        gids = None if group_ids is None else np.asarray(group_ids, dtype=np.int64)
        if getattr(self.reward, "needs_groups", False) and gids is None:
            raise RequestProblem(422, f"reward {name} compares images within prompt groups: send group_ids")
        t0 = time.perf_counter()
        with self.lock:
            self.busy = True
            try:
                out = self.reward(images, prompts, metadata, gids) if len(images) else None
            except (RewardError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise RequestProblem(422, f"reward {name} rejected the request: {type(exc).__name__}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - the worker must survive whatever the model does
                log.exception("reward %s failed", name)
                raise RequestProblem(500, f"reward {name} failed: {type(exc).__name__}: {exc}") from None
            finally:
                self.busy = False
                self.calls += 1
        if out is None:
            return {"reward": name, "scores": [], "components": {}, "info": {}, "elapsed_s": 0.0}
        scores = np.asarray(out.scores, dtype=np.float64).ravel()
        if scores.shape[0] != len(images):
            raise RequestProblem(500, f"reward {name} returned {scores.shape[0]} scores for {len(images)} images")
        components = {k: _finite_or_none(v) for k, v in (out.components or {}).items()
                      if np.asarray(v).ravel().shape[0] == len(images)}
        info = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in (out.info or {}).items()}
        return {"reward": name, "scores": _finite_or_none(scores), "components": components, "info": info,
                "elapsed_s": round(time.perf_counter() - t0, 6)}


def _openapi_schemas() -> tuple[dict, dict]:
    from pydantic import BaseModel, Field

    class ScoreRequest(BaseModel):
        images: list[str] = Field(description="base64 PNG/JPEG/WebP images (data: URLs accepted), one size")
        prompts: list[str] = Field(description="one prompt per image")
        metadata: list[dict | None] | None = Field(None, description="one object per image, e.g. GenEval records")
        group_ids: list[int] | None = Field(None, description="prompt group of each image (pairwise rewards)")

    class ScoreResponse(BaseModel):
        reward: str
        scores: list[float | None] = Field(description="one score per image; null for NaN/inf")
        components: dict[str, list[float | None]]
        info: dict[str, float | None]
        elapsed_s: float

    multipart = {"type": "object", "required": ["images", "prompts"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "prompts": {"type": "array", "items": {"type": "string"}},
        "metadata": {"type": "string", "description": "JSON array of objects"},
        "group_ids": {"type": "string", "description": "JSON array of integers"}}}
    body = {"required": True, "content": {"application/json": {"schema": ScoreRequest.model_json_schema()},
                                          "multipart/form-data": {"schema": multipart}}}
    return body, ScoreResponse


def create_app(reward: Reward, *, token: str | None = None, max_batch: int = 64, max_image_side: int = 2048,
               max_body_mb: float = 256.0):
    """A FastAPI app serving `reward` (see the module docstring for the protocol)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    service = RewardService(reward, token, max_batch, max_image_side, int(max_body_mb * 2**20))
    name = getattr(reward, "name", "reward")
    app = FastAPI(title=f"flowgrpo reward server: {name}", version=str(PROTOCOL_VERSION),
                  description="Scores images with one flowgrpo reward. JSON or multipart in, JSON out; never pickle.")
    app.state.service = service
    body_schema, response_model = _openapi_schemas()
    errors = {code: {"description": text, "content": {"application/json": {"example": {"detail": "..."}}}}
              for code, text in [(400, "malformed body, bad base64, not an image"), (401, "missing or wrong token"),
                                 (413, "body, batch or image too large"), (415, "unsupported content type"),
                                 (422, "inconsistent request or rejected by the reward"),
                                 (500, "the reward failed on valid input")]}

    def problem(exc: RequestProblem) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    async def read_body(request: Request) -> bytes:
        limit = service.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestProblem(413, f"request body of {int(declared)} bytes exceeds the server's limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestProblem(413, f"request body exceeds the server's limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_form(request: Request, body: bytes):
        from starlette.requests import Request as StarletteRequest

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await StarletteRequest(request.scope, replay).form(max_files=service.max_batch + 1,
                                                                      max_fields=4 * service.max_batch + 8,
                                                                      max_part_size=16 * 2**20)
        except AssertionError:  # starlette's message when python-multipart is missing
            raise RequestProblem(415, "this server cannot read multipart bodies (pip install python-multipart); "
                                      "send JSON") from None
        except Exception as exc:  # noqa: BLE001 - any parser complaint is a malformed body
            raise RequestProblem(400, f"malformed multipart body: {exc}") from None
        files = [await f.read() for f in form.getlist("images") if hasattr(f, "read")]
        prompts = [p for p in form.getlist("prompts") if isinstance(p, str)]
        meta, gids = form.get("metadata"), form.get("group_ids")
        return files, prompts, meta if isinstance(meta, str) else None, gids if isinstance(gids, str) else None

    @app.get("/health", summary="Liveness, protocol version, reward kind and the server's limits")
    async def health() -> dict:
        return service.health()

    @app.post("/score", summary="Score a batch of images", openapi_extra={"requestBody": body_schema},
              response_model=response_model, responses=errors)
    async def score(request: Request):
        try:
            service.check_token(request.headers.get("authorization"))
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in ("application/json", "multipart/form-data", ""):
                raise RequestProblem(415, f"unsupported content type {ctype!r}; send application/json or multipart")
            body = await read_body(request)
            if ctype == "multipart/form-data":
                parsed = service.parse_form(*(await read_form(request, body)))
            else:
                parsed = service.parse_json(body)
            result = await run_in_threadpool(service.score, *parsed)
        except RequestProblem as exc:
            return problem(exc)
        return JSONResponse(result)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):  # last resort: a JSON 500, never a dropped connection
        log.exception("unexpected error serving %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    return app


# ----------------------------------------------------------------------------- command line


def parse_args_kv(pairs: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs; values are read as JSON when they parse (numbers, booleans, lists), else text."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RewardError(f"--arg expects key=value, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _serve(args) -> int:
    import importlib

    import uvicorn

    for module in args.imports or []:
        try:
            importlib.import_module(module)  # lets a user module @register its own reward
        except ImportError as exc:
            raise RewardError(f"--import {module}: {exc}") from None
    reward = make_reward(args.name, **parse_args_kv(args.arg))
    if args.bench_latency:
        reward = DelayedReward(reward, args.bench_latency)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("serving on %s without a token: anyone who can reach the port can use the reward", args.host)
        print(f"warning: serving on {args.host} without a token; set --token or ${TOKEN_ENV}")
    app = create_app(reward, token=token, max_batch=args.max_batch, max_image_side=args.max_image_side,
                     max_body_mb=args.max_body_mb)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("serve-reward", help="serve a registered reward over HTTP (JSON, never pickle)",
                              description="Serve one registered reward over HTTP: POST /score, GET /health, "
                                          "OpenAPI at /docs. Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("name", help="registered reward name, e.g. ocr, pickscore, shapes_partial")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--token", default=None, help=f"require this bearer token (default ${TOKEN_ENV}, if set)")
    p.add_argument("--max-batch", type=int, default=64, help="most images per request (default 64)")
    p.add_argument("--max-image-side", type=int, default=2048, help="largest image width or height (default 2048)")
    p.add_argument("--max-body-mb", type=float, default=256.0, help="largest request body in MiB (default 256)")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE",
                   help="argument for the reward (repeatable), e.g. --arg backend=tesseract")
    p.add_argument("--import", dest="imports", action="append", metavar="MODULE",
                   help="import a module first, e.g. one that registers its own reward (repeatable)")
    p.add_argument("--bench-latency", type=float, default=0.0, metavar="SECONDS",
                   help="benchmarking only: add SECONDS per image to every call, as a slow reward model would")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)

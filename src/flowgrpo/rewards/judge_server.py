"""`flowgrpo serve-judge`: any local pairwise judge behind an OpenAI-compatible API.

POST /v1/chat/completions takes the pairwise request a UnifiedReward judge gets (one user
message with two base64 images and an instruction holding the caption, see vlm_judge.py),
runs the local judge (shapes, bradley_terry over a pointwise reward, ...) and answers in the
format the instruction asks for: UnifiedReward-Think (<think> + <answer>Image N is
better</answer>) or UnifiedReward-Flex (JSON with "winner"). So a judge can live in its own
environment or machine, and the VLM client is tested end to end without a GPU.

A judge's probability p = P(Image 1 better) becomes a verdict: `threshold` (default) answers
Image 1 for p > 0.5, Image 2 for p < 0.5 and the tie extension at exactly 0.5; `sample` draws
Image 1 with probability p (seeded), so that the client's win rates are unbiased for soft
judges. The <think> block reports p; a local judge has no per-dimension scores and none are
invented.

Also: GET /health (no token needed) and GET /v1/models. Requests are checked: 400 with an
OpenAI-style error body for anything malformed (not JSON, no user message, not exactly two
images, an image that is not a base64 data URL, no caption found), 401 without the bearer
token when one is set, 413 for bodies over the size limit, 503 if the judge could not
answer (clients retry). Image URLs are never fetched. Binds 127.0.0.1 unless told.

For measurement only, `--bench-latency S --bench-slots K` makes every comparison take S
seconds more, at most K at once (a served VLM answers a batch of requests together): a cheap
judge then stands for a slow one (docs/performance.md).

    flowgrpo serve-judge --judge shapes --port 8100
    flowgrpo serve-judge --judge bradley_terry --judge-args '{"reward": "shapes_partial", "tau": 0.05}' \\
        --verdict sample --token "$TOKEN"
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import os
import sys
import threading
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from .base import RewardError
from .pairwise import Judge, make_judge
from .vlm_judge import TIE_ANSWER, extract_caption

MAX_REQUEST_BYTES = 64 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(part: dict, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An OpenAI `image_url` content part holding a base64 data URL -> uint8 HxWx3."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(400, "images must be base64 data URLs (data:image/png;base64,...); "
                                "this server does not fetch image URLs")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise RequestError(400, "image data URL is not base64-encoded")
    try:
        raw = base64.b64decode(payload, validate=True)
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > max_pixels:
            raise RequestError(413, f"image of {img.width}x{img.height} exceeds the {max_pixels}-pixel limit")
        return np.asarray(img.convert("RGB"))
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as exc:
        raise RequestError(400, f"could not decode image: {exc}") from None


def parse_pairwise_request(body, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, str, np.ndarray, np.ndarray]:
    """(caption, answer format, image 1, image 2) from a chat-completions body."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise RequestError(400, "body must be a JSON object with a 'messages' list")
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError(400, "no user message")
    content = users[-1].get("content")
    if not isinstance(content, list):
        raise RequestError(400, "the user message content must be a list of parts: two images and the instruction")
    images = [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
    texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    if len(images) != 2:
        raise RequestError(400, f"a pairwise request needs exactly 2 images, got {len(images)}")
    text = "\n".join(t for t in texts if isinstance(t, str))
    found = extract_caption(text)
    if found is None:
        raise RequestError(400, "no caption in the instruction: put it between 「 」 (Think format) "
                                "or on a line 'Prompt: [...]' (Flex format)")
    caption, fmt = found
    return caption, fmt, decode_image(images[0], max_pixels), decode_image(images[1], max_pixels)


def render_answer(p: float, verdict: int, fmt: str, judge_name: str, caption: str) -> str:
    """The assistant message for verdict 1, 2 or 0 (tie)."""
    if fmt == "flex":
        winner = {1: "Image 1", 2: "Image 2", 0: "Tie"}[verdict]
        return json.dumps({"prompt": caption, "categories": [],
                           "reason": f"local judge {judge_name}: P(Image 1 is better) = {p:.4f}",
                           "winner": winner})
    answer = {1: "Image 1 is better", 2: "Image 2 is better", 0: TIE_ANSWER}[verdict]
    return (f"<think>\nLocal judge {judge_name} (no per-dimension scores).\n"
            f"P(Image 1 is better) = {p:.4f}\n</think>\n<answer>{answer}</answer>")


def create_app(judge: Judge, model_name: str = "flowgrpo-judge", token: str | None = None,
               verdict: str = "threshold", seed: int = 0, max_request_bytes: int = MAX_REQUEST_BYTES,
               max_image_pixels: int = MAX_IMAGE_PIXELS, bench_latency: float = 0.0, bench_slots: int = 1):
    if not bench_latency >= 0 or bench_slots < 1:
        raise RewardError(f"--bench-latency must be >= 0 and --bench-slots >= 1, got {bench_latency}, {bench_slots}")
    if verdict not in ("threshold", "sample"):
        raise RewardError(f"verdict must be 'threshold' or 'sample', got {verdict!r}")
    app = FastAPI(title="flowgrpo judge", description=f"pairwise judge {judge.name}")
    lock = threading.Lock()  # judges (torch models, verifiers) are not assumed thread-safe
    slots = threading.Semaphore(bench_slots)
    rng = np.random.default_rng(seed)
    stats = {"requests": 0, "failures": 0}

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return JSONResponse({"error": {"message": exc.message, "type": "invalid_request_error", "code": exc.status}},
                            status_code=exc.status)

    def check_token(request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")

    def run_judge(caption: str, a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
        if bench_latency:
            with slots:
                time.sleep(bench_latency)
        with lock:
            res = judge.judge([caption], a[None], b[None])
            p, failed = float(np.asarray(res.probs)[0]), bool(np.asarray(res.failed)[0])
            if failed:
                stats["failures"] += 1
                raise RequestError(503, f"judge {judge.name} could not compare this pair")
            if verdict == "sample":
                return p, 1 if rng.random() < p else 2
        return p, 1 if p > 0.5 else 2 if p < 0.5 else 0

    @app.get("/health")
    def health():
        return {"status": "ok", "judge": judge.name, "model": model_name, **stats}

    @app.get("/v1/models")
    def models(request: Request):
        check_token(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "flowgrpo"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_token(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            raise RequestError(413, f"request of {length} bytes exceeds the {max_request_bytes}-byte limit")
        raw = await request.body()
        if len(raw) > max_request_bytes:
            raise RequestError(413, f"request exceeds the {max_request_bytes}-byte limit")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "body is not valid JSON") from None
        stats["requests"] += 1
        caption, fmt, a, b = parse_pairwise_request(body, max_image_pixels)
        p, v = await run_in_threadpool(run_judge, caption, a, b)
        content = render_answer(p, v, fmt, judge.name, caption)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}

    return app


def _serve(args) -> int:
    import uvicorn

    try:
        judge_args = json.loads(args.judge_args)
    except json.JSONDecodeError as exc:
        raise RewardError(f"--judge-args is not valid JSON ({exc}); "
                          "e.g. '{\"reward\": \"shapes_partial\"}'") from None
    if not isinstance(judge_args, dict):
        raise RewardError("--judge-args must be a JSON object, e.g. '{\"tau\": 0.1}'")
    judge = make_judge(args.judge, **judge_args)
    token = args.token or os.environ.get("FLOWGRPO_JUDGE_TOKEN") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"warning: serving on {args.host} without a token; anyone who reaches the port can use the "
              "judge (set --token or FLOWGRPO_JUDGE_TOKEN)", file=sys.stderr)
    app = create_app(judge, model_name=args.model_name, token=token, verdict=args.verdict, seed=args.seed,
                     bench_latency=args.bench_latency, bench_slots=args.bench_slots)
    print(f"serving judge {judge.name} as model {args.model_name!r} at http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "serve-judge", help="serve a local pairwise judge over an OpenAI-compatible chat API",
        description="Answer UnifiedReward-Think/Flex pairwise requests with a local judge.")
    p.add_argument("--judge", required=True, help="judge name: shapes, bradley_terry, vlm")
    p.add_argument("--judge-args", default="{}", help="judge arguments as a JSON object")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--token", default=None, help="require this bearer token (default: $FLOWGRPO_JUDGE_TOKEN)")
    p.add_argument("--model-name", default="flowgrpo-judge", help="model name listed by /v1/models")
    p.add_argument("--verdict", choices=("threshold", "sample"), default="threshold",
                   help="how a probability becomes a verdict (see the module docstring)")
    p.add_argument("--seed", type=int, default=0, help="seed for --verdict sample")
    p.add_argument("--bench-latency", type=float, default=0.0, metavar="SECONDS",
                   help="benchmarking only: add SECONDS to every comparison, as a slow VLM judge would")
    p.add_argument("--bench-slots", type=int, default=1, metavar="K",
                   help="benchmarking only: comparisons that wait out --bench-latency at once (default 1)")
    p.set_defaults(func=_serve)

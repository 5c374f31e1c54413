"""Loopback servers for tests that speak real HTTP: any ASGI app on 127.0.0.1 in a background
thread, and a scripted OpenAI-compatible chat-completions server (the judges' and VLM
rewards' counterpart)."""

import base64
import collections
import contextlib
import inspect
import io
import socket
import threading
import time
from typing import Callable, Iterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, port: int | None = None) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) while `app` serves; stop it afterwards."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def request_text(body: dict) -> str:
    """The text part of a chat request's first message."""
    return next(p["text"] for p in body["messages"][0]["content"] if p["type"] == "text")


def decode_image(part: dict) -> np.ndarray:
    """The RGB pixels of one image_url part (a base64 data URL)."""
    from PIL import Image

    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def request_images(body: dict) -> list[np.ndarray]:
    return [decode_image(p) for p in body["messages"][0]["content"] if p["type"] == "image_url"]


def chat_app(answer: Callable, key: Callable[[str], str] | None = None):
    """A chat-completions server (POST /v1/chat/completions) scripted by `answer(text, n, body)`:
    text is the first message's text part, n how often its key (`key(text)`, default the text
    itself) was asked so far, 1 the first time. The answer is the reply's content, an int HTTP
    status to fail with, or a coroutine giving either (a slow judge sleeps in it).

    Returns (app, log): log holds every request body in order; app.state.headers the request
    headers in the same order, app.state.seen the count per key."""
    app, log = FastAPI(), []
    app.state.seen, app.state.headers = collections.Counter(), []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        log.append(body)
        app.state.headers.append(dict(request.headers))
        text = request_text(body)
        k = key(text) if key is not None else text
        app.state.seen[k] += 1
        reply = answer(text, app.state.seen[k], body)
        if inspect.isawaitable(reply):
            reply = await reply
        if isinstance(reply, int):
            return JSONResponse({"error": {"message": f"scripted failure {reply}"}}, status_code=reply)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}

    return app, log

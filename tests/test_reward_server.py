"""The reward server end to end over 127.0.0.1: protocol, limits, errors, token, the remote and
GenEval clients, and a client call that survives a server restart (a real `flowgrpo
serve-reward` process killed mid-request)."""

import base64
import io
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from helpers.servers import free_port, serve_app

from flowgrpo.cli import build_parser
from flowgrpo.rewards import Reward, RewardError, RewardOutput, make_reward
from flowgrpo.rewards.server import create_app, encode_png_base64, parse_args_kv
from flowgrpo.worlds.shapes.grammar import parse_prompt
from flowgrpo.worlds.shapes.render import render


class MeanPixel(Reward):
    """Deterministic test reward: mean pixel / 255; a NaN component; fails on request."""

    name = "mean_pixel"

    def __call__(self, images, prompts, metadata=None, group_ids=None):
        if any(p == "bad-metadata" for p in prompts):
            raise ValueError("metadata says no")
        if any(p == "crash" for p in prompts):
            raise RuntimeError("model fell over")
        scores = images.reshape(len(images), -1).mean(1) / 255.0
        odd = np.where(np.arange(len(images)) % 2 == 1, np.nan, scores)
        return RewardOutput(scores, {"odd_nan": odd}, {"calls": 1.0})


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _body(images, prompts=None, **extra):
    prompts = prompts if prompts is not None else [f"p{i}" for i in range(len(images))]
    return {"images": [encode_png_base64(im) for im in images], "prompts": prompts, **extra}


@pytest.fixture(scope="module")
def open_server():
    with serve_app(create_app(MeanPixel(), max_batch=4, max_image_side=64, max_body_mb=1.0)) as url:
        yield url


def test_health_and_openapi(open_server):
    health = httpx.get(open_server + "/health").json()
    assert health["status"] == "ok" and health["protocol"] == 1
    assert health["reward"] == "mean_pixel" and health["kind"] == "pointwise" and health["max_batch"] == 4
    schema = httpx.get(open_server + "/openapi.json").json()
    body = schema["paths"]["/score"]["post"]["requestBody"]["content"]
    assert set(body["application/json"]["schema"]["required"]) == {"images", "prompts"}
    assert "multipart/form-data" in body


def test_remote_client_matches_in_process_scores(open_server):
    images = _images(7)
    local = MeanPixel()(images, ["x"] * 7)
    client = make_reward("remote:" + open_server)
    assert client.name == "remote:mean_pixel" and client.kind == "pointwise"
    out = client(images, ["x"] * 7)
    np.testing.assert_allclose(out.scores, local.scores, rtol=0, atol=1e-12)  # PNG is lossless
    # NaN travels as null and comes back as NaN, in the right places across 2 chunks (max_batch 4)
    np.testing.assert_array_equal(np.isnan(out.components["odd_nan"]), np.arange(7) % 2 == 1)
    assert out.info["remote_requests"] == 2 and out.info["calls"] == 2  # server info summed over chunks


def test_multipart_upload(open_server):
    images = _images(2)
    files = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        files.append(("images", ("a.png", buf.getvalue(), "image/png")))
    resp = httpx.post(open_server + "/score", files=files, data={"prompts": ["a", "b"]})
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(resp.json()["scores"], MeanPixel()(images, ["a", "b"]).scores)


def _png_header_only(side: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _post(url, content=None, **kw):
    return httpx.post(url + "/score", content=content, **kw)


@pytest.mark.parametrize("case, status, message", [
    ("malformed_json", 400, "not valid JSON"),
    ("not_an_object", 400, "JSON object"),
    ("bad_base64", 400, "images[1] is not valid base64"),
    ("not_an_image", 400, "images[0] is not a PNG, JPEG or WebP image"),
    ("oversized_image", 413, "larger than the server's max image side 64"),
    ("bomb_header", 413, "more pixels than Pillow will decode"),
    ("truncated_image", 400, "images[0] is a corrupt or truncated image"),
    ("batch_too_large", 413, "exceeds the server's max batch 4"),
    ("body_too_large", 413, "exceeds the server's limit"),
    ("length_mismatch", 422, "2 images but 1 prompts"),
    ("mixed_sizes", 422, "one size"),
    ("wrong_content_type", 415, "unsupported content type"),
    ("reward_rejects", 422, "metadata says no"),
])
def test_malformed_requests_get_clear_4xx(open_server, case, status, message):
    good = _body(_images(2))
    if case == "malformed_json":
        resp = _post(open_server, b'{"images": [', headers={"content-type": "application/json"})
    elif case == "not_an_object":
        resp = _post(open_server, b"[1, 2]", headers={"content-type": "application/json"})
    elif case == "bad_base64":
        good["images"][1] = "this is not base64!!"
        resp = httpx.post(open_server + "/score", json=good)
    elif case == "not_an_image":
        good["images"][0] = base64.b64encode(b"GIF89a but not really").decode()
        resp = httpx.post(open_server + "/score", json=good)
    elif case == "oversized_image":
        resp = httpx.post(open_server + "/score", json=_body(_images(1, size=65)))
    elif case in ("bomb_header", "truncated_image"):
        side = 100_000 if case == "bomb_header" else 8  # a PNG header with no pixel data after it
        good["images"][0] = base64.b64encode(_png_header_only(side)).decode()
        resp = httpx.post(open_server + "/score", json=good)
    elif case == "batch_too_large":
        resp = httpx.post(open_server + "/score", json=_body(_images(5)))
    elif case == "body_too_large":
        resp = _post(open_server, b"x" * (2 * 2**20), headers={"content-type": "application/json"})
    elif case == "length_mismatch":
        good["prompts"] = ["only one"]
        resp = httpx.post(open_server + "/score", json=good)
    elif case == "mixed_sizes":
        good["images"][1] = encode_png_base64(_images(1, size=8)[0])
        resp = httpx.post(open_server + "/score", json=good)
    elif case == "wrong_content_type":
        resp = _post(open_server, b"hello", headers={"content-type": "text/plain"})
    else:
        resp = httpx.post(open_server + "/score", json=_body(_images(1), ["bad-metadata"]))
    assert resp.status_code == status, resp.text
    assert message in resp.json()["detail"]
    assert httpx.get(open_server + "/health").status_code == 200  # the worker is alive


def test_reward_crash_is_a_json_500_and_the_server_keeps_serving(open_server):
    resp = httpx.post(open_server + "/score", json=_body(_images(1), ["crash"]))
    assert resp.status_code == 500 and "model fell over" in resp.json()["detail"]
    assert httpx.post(open_server + "/score", json=_body(_images(1))).status_code == 200


def test_client_raises_the_servers_4xx_explanation_at_once(open_server):
    client = make_reward("remote:" + open_server, max_retries=5)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match="metadata says no"):
        client(_images(1), ["bad-metadata"])
    assert time.perf_counter() - t0 < 1.0  # no retries on a request the server says is wrong


def test_bearer_token():
    with serve_app(create_app(MeanPixel(), token="s3cret")) as url:
        body = _body(_images(1))
        assert httpx.post(url + "/score", json=body).status_code == 401
        wrong = httpx.post(url + "/score", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "token" in wrong.json()["detail"]
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert httpx.post(url + "/score", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(RewardError, match="refused the token"):
            make_reward("remote:" + url, token="nope")(_images(1), ["x"])
        assert make_reward("remote:" + url, token="s3cret")(_images(1), ["x"]).scores.shape == (1,)


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(RewardError, match="is `flowgrpo serve-reward` running there"):
        make_reward(f"remote:127.0.0.1:{free_port()}", max_retries=1, backoff=0.01)


def test_geneval_client_against_the_shapes_scorer():
    records = [parse_prompt(p) for p in ["a photo of a red circle", "a photo of two squares",
                                         "a photo of a green triangle"]]
    rng = np.random.default_rng(0)
    images = np.stack([render(records[0], rng=rng, size=64), render(records[1], rng=rng, size=64),
                       render(records[0], rng=rng, size=64)])  # the third shows the wrong scene
    with serve_app(create_app(make_reward("geneval_shapes"))) as url:
        strict = make_reward("geneval", url=url, mode="strict")
        out = strict(images, [r["prompt"] for r in records], records)
        np.testing.assert_array_equal(out.scores, [1, 1, 0])
        assert out.info["geneval_strict"] == pytest.approx(2 / 3)
        assert out.info[f"geneval_strict/{records[1]['tag']}"] == 1.0
        with pytest.raises(RewardError, match="GenEval record"):
            strict(images[:1], ["x"], [{"tag": "counting"}])
    with serve_app(create_app(MeanPixel())) as url:  # a server that is not a GenEval scorer
        with pytest.raises(RewardError, match="GenEval strict/partial"):
            make_reward("geneval", url=url)(images[:1], ["x"], records[:1])


def test_cli_parser_and_args():
    args = build_parser().parse_args(["serve-reward", "ocr", "--port", "9", "--arg", "backend=tesseract",
                                      "--arg", "psm=6", "--max-batch", "8", "--token", "t"])
    assert (args.name, args.host, args.port, args.max_batch, args.token) == ("ocr", "127.0.0.1", 9, 8, "t")
    assert parse_args_kv(args.arg) == {"backend": "tesseract", "psm": 6}
    assert parse_args_kv(["x=true", "y=[1, 2]", "z=a=b"]) == {"x": True, "y": [1, 2], "z": "a=b"}
    with pytest.raises(RewardError, match="key=value"):
        parse_args_kv(["novalue"])


PLUGIN = textwrap.dedent('''
    """A slow test reward for the restart test: marks each call's start in a file."""
    import os, time
    import numpy as np
    from flowgrpo.rewards import Reward, RewardOutput, register

    class Slow(Reward):
        name = "slow_mean"
        def __init__(self, delay=1.0, marker=""):
            self.delay, self.marker = float(delay), marker
        def __call__(self, images, prompts, metadata=None, group_ids=None):
            with open(self.marker, "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(self.delay)
            return RewardOutput(images.reshape(len(images), -1).mean(1) / 255.0)

    register("slow_mean")(Slow)
''')


def _start_server(tmp_path, port, marker):
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "flowgrpo", "serve-reward", "slow_mean", "--import", "slow_plugin",
           "--port", str(port), "--arg", "delay=1.0", "--arg", f"marker={marker}", "--log-level", "error"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_healthy(url, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not come up")


def test_client_survives_a_server_restart_mid_call(tmp_path):
    (tmp_path / "slow_plugin.py").write_text(PLUGIN)
    marker = tmp_path / "calls.txt"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = _start_server(tmp_path, port, marker)
    second = None
    try:
        _wait_healthy(url, first)
        client = make_reward("remote:" + url, max_retries=30, backoff=0.2, max_backoff=1.0, timeout=30)
        images = _images(3)
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=client(images, ["a", "b", "c"])))
        worker.start()
        deadline = time.time() + 30
        while not (marker.exists() and marker.read_text().strip()) and time.time() < deadline:
            time.sleep(0.02)
        first.kill()  # mid-request: the reward is sleeping inside the call
        first.wait(timeout=10)
        second = _start_server(tmp_path, port, marker)
        worker.join(timeout=90)
        assert not worker.is_alive()
        out = result["out"]
        np.testing.assert_allclose(out.scores, images.reshape(3, -1).mean(1) / 255.0)
        assert out.info["remote_retries"] >= 1
        pids = marker.read_text().split()
        assert len(pids) == 2 and pids[0] == str(first.pid) and pids[1] == str(second.pid)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)

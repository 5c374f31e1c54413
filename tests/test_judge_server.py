"""`flowgrpo serve-judge` end to end: local judges behind the OpenAI-compatible API, called
through the VLM judge client, must give the same win rates as in-process; bad requests get 4xx."""

import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from helpers.servers import free_port, serve_app

from flowgrpo.chat import image_part, text_part
from flowgrpo.cli import main
from flowgrpo.rewards import Reward, RewardOutput, make_reward
from flowgrpo.rewards.judge_server import create_app
from flowgrpo.rewards.pairwise import BradleyTerryJudge, ShapesJudge
from flowgrpo.rewards.vlm_judge import THINK_INSTRUCTION, VLMJudge
from flowgrpo.worlds.shapes.grammar import parse_prompt
from flowgrpo.worlds.shapes.render import render

PROMPT = "a photo of a red square"


def shapes_group():
    rec, wrong = parse_prompt(PROMPT), parse_prompt("a photo of two circles")
    return np.stack([render(rec, 0), render(wrong, 0), render(rec, 1), render(wrong, 1), render(rec, 2)])


@pytest.mark.parametrize("fmt", ["think", "flex"])
def test_served_shapes_judge_matches_the_in_process_judge(fmt):
    imgs, g = shapes_group(), np.zeros(5)
    local = make_reward("pref_winrate", judge="shapes", both_orders=True)(imgs, [PROMPT] * 5, group_ids=g)
    with serve_app(create_app(ShapesJudge(), model_name="shapes-judge")) as url:
        remote = make_reward("pref_winrate", judge="vlm", both_orders=True,
                             judge_args={"base_url": url + "/v1", "model": "shapes-judge", "format": fmt,
                                         "backoff": 0.01})
        out = remote(imgs, [PROMPT] * 5, group_ids=g)
        health = httpx.get(url + "/health").json()
    np.testing.assert_allclose(out.scores, local.scores)
    np.testing.assert_allclose(out.scores, [0.75, 0.125, 0.75, 0.125, 0.75])
    assert out.info["failures"] == 0 and out.info["ties"] == local.info["ties"] == 8
    assert health["requests"] == 20 and health["failures"] == 0


class Level(Reward):
    name = "level"

    def __call__(self, images, prompts, metadata=None, group_ids=None):
        return RewardOutput(images.reshape(len(images), -1).mean(1) / 255.0)


def test_sampled_verdicts_follow_a_soft_judges_probability():
    a = np.full((1, 8, 8, 3), 153, np.uint8)
    b = np.full((1, 8, 8, 3), 102, np.uint8)
    judge = BradleyTerryJudge(Level(), tau=0.2)  # P(a > b) = sigmoid(0.2 / 0.2) = 0.731
    n = 120
    with serve_app(create_app(judge, verdict="sample", seed=3)) as url:
        client = VLMJudge(base_url=url + "/v1", backoff=0.01)
        res = client.judge(["x"] * n, np.repeat(a, n, 0), np.repeat(b, n, 0))
    assert not res.failed.any() and set(np.unique(res.probs)) <= {0.0, 1.0}
    assert abs(res.probs.mean() - 0.731) < 0.13  # 3 standard errors


def pairwise_body(text=None, images=2, url=None):
    img = np.zeros((8, 8, 3), np.uint8)
    parts = [image_part(img) for _ in range(images)]
    if url:
        parts[0] = {"type": "image_url", "image_url": {"url": url}}
    parts.append(text_part(THINK_INSTRUCTION.replace("{prompt}", PROMPT) if text is None else text))
    return {"model": "m", "messages": [{"role": "user", "content": parts}]}


def test_malformed_requests_get_4xx_and_the_token_is_enforced():
    app = create_app(ShapesJudge(), token="t0ken", max_request_bytes=200_000)
    auth = {"Authorization": "Bearer t0ken"}
    with serve_app(app) as url:
        def post(body=None, headers=auth):
            return httpx.post(url + "/v1/chat/completions", json=body, headers=headers)

        assert post(pairwise_body()).status_code == 200
        assert post(pairwise_body(), headers={}).status_code == 401
        assert post(pairwise_body(), headers={"Authorization": "Bearer nope"}).status_code == 401
        cases = {
            "not json": httpx.post(url + "/v1/chat/completions", content=b"{oops", headers=auth),
            "no messages": post({"model": "m"}),
            "one image": post(pairwise_body(images=1)),
            "three images": post(pairwise_body(images=3)),
            "remote url": post(pairwise_body(url="http://example.com/a.png")),
            "bad base64": post(pairwise_body(url="data:image/png;base64,@@@")),
            "not an image": post(pairwise_body(url="data:image/png;base64,aGVsbG8=")),
            "no caption": post(pairwise_body(text="which is better?")),
            "string content": post({"messages": [{"role": "user", "content": "hi"}]}),
        }
        for name, resp in cases.items():
            assert resp.status_code == 400, name
            assert resp.json()["error"]["message"], name
        big = post(pairwise_body(text="「x」" + "y" * 300_000))
        assert big.status_code == 413
        assert httpx.get(url + "/health").status_code == 200  # no token needed
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers=auth).json()
        assert models["data"][0]["id"] == "flowgrpo-judge"
        answer = post(pairwise_body()).json()["choices"][0]["message"]["content"]
        assert "<answer>Both images are equally good</answer>" in answer  # two black images tie


def test_cli_errors_are_one_line(capsys):
    assert main(["serve-judge", "--judge", "nope"]) == 2
    assert "unknown judge 'nope'" in capsys.readouterr().err
    assert main(["serve-judge", "--judge", "shapes", "--judge-args", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_serve_judge_command_end_to_end():
    port = free_port()
    env = {**os.environ, "FLOWGRPO_JUDGE_TOKEN": "tok", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flowgrpo", "serve-judge", "--judge", "bradley_terry",
                             "--judge-args", '{"reward": "shapes_partial", "tau": 0}', "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "serve-judge did not start"
            time.sleep(0.2)
        imgs = shapes_group()[:3]
        judge = VLMJudge(base_url=base + "/v1", api_key="tok", backoff=0.01)
        out = make_reward("pref_winrate", judge=judge)(imgs, [PROMPT] * 3, group_ids=np.zeros(3))
        np.testing.assert_allclose(out.scores, [0.75, 0.0, 0.75])
        assert VLMJudge(base_url=base + "/v1", max_retries=0).judge([PROMPT], imgs[:1], imgs[1:2]).failed[0]
    finally:
        proc.terminate()
        proc.wait(timeout=20)

"""VLM score against a real chat-completions server on 127.0.0.1 that this test runs.

The fake server answers by a keyword in the caption: "good-N" (Final Score: N), "bold"
(markdown emphasis), "garbage" (no score), "outofrange" (Final Score: 9), "slow" (answers
after the client's timeout) and "flaky" (503 the first time, then a score).
"""

import asyncio
import re
import time

import numpy as np
import pytest
from helpers.servers import chat_app, request_images, serve_app

from flowgrpo.rewards import RewardError, make_reward
from flowgrpo.rewards.vlm import parse_final_score


def caption_of(text: str) -> str:
    return re.search(r"Caption: \[(.*)\]", text).group(1)


def vlm_app():
    """The scripted scorer; app.state.images keeps (caption, image received) for every request."""
    images = []

    async def answer(text, n, body):
        caption = caption_of(text)
        images.append((caption, request_images(body)[0]))
        if caption.startswith("good-"):
            return f"The objects match and the image is clean.\nFinal Score: {caption.split('-')[1]}"
        if caption == "slow":
            await asyncio.sleep(1.5)
        if caption == "flaky" and n == 1:
            return 503
        return {"bold": "Reasoning...\n**Final Score:** 4", "garbage": "What a lovely picture of something.",
                "outofrange": "Final Score: 9", "slow": "Final Score: 5", "flaky": "Final Score: 5"}.get(caption, "?")

    app, _ = chat_app(answer, key=caption_of)
    app.state.images = images
    return app


@pytest.fixture(scope="module")
def server():
    app = vlm_app()
    with serve_app(app) as url:
        yield url, app


def _reward(url, **kw):
    return make_reward("vlm_score", base_url=url + "/v1", model="test", timeout=0.5, max_retries=1, backoff=0.01,
                       **kw)


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 24, 20, 3), dtype=np.uint8)


def test_parse_final_score():
    assert parse_final_score("blah\nFinal Score: 4") == 4.0
    assert parse_final_score("final score:3.5") == 3.5
    assert parse_final_score("**Final Score:** 2") == 2.0
    assert parse_final_score("Final Score: 1 ... on reflection, Final Score: 5") == 5.0  # the last one counts
    assert parse_final_score("Final Score: 0") is None  # out of range
    assert parse_final_score("Final Score: 6") is None
    assert parse_final_score("Score: 4") is None
    assert parse_final_score(None) is None


def test_good_answers_scored_and_images_sent_intact(server):
    url, app = server
    images = _images(3)
    out = _reward(url)(images, ["good-4", "good-3", "bold"])
    np.testing.assert_allclose(out.scores, [0.8, 0.6, 0.8])
    np.testing.assert_array_equal(out.components["vlm_raw"], [4, 3, 4])
    assert out.info == {"vlm_requests": 3.0, "vlm_unparsable": 0.0, "vlm_request_failures": 0.0}
    received = {cap: img for cap, img in app.state.images}
    np.testing.assert_array_equal(received["good-3"], images[1])  # lossless PNG round trip


def test_garbage_answers_get_the_fallback_not_an_exception(server):
    url, _ = server
    prompts = ["good-4", "garbage", "good-2", "outofrange"]
    out = _reward(url)(_images(4), prompts, group_ids=np.array([0, 0, 1, 1]))
    # group_mean: a failed image gets its group's mean, so it carries no advantage signal
    np.testing.assert_allclose(out.scores, [0.8, 0.8, 0.4, 0.4])
    np.testing.assert_array_equal(out.components["vlm_failed"], [0, 1, 0, 1])
    assert out.info["vlm_unparsable"] == 2 and out.info["vlm_request_failures"] == 0
    const = _reward(url, fallback=0.1)(_images(2), ["garbage", "good-5"])
    np.testing.assert_allclose(const.scores, [0.1, 1.0])
    # nothing scored at all: group_mean falls back to 0
    np.testing.assert_allclose(_reward(url)(_images(1), ["garbage"]).scores, [0.0])


def test_slow_answers_beyond_the_timeout_are_counted_failures(server):
    url, _ = server
    t0 = time.perf_counter()
    out = _reward(url)(_images(2), ["slow", "good-5"])
    elapsed = time.perf_counter() - t0
    assert out.info["vlm_request_failures"] == 1
    assert out.info["vlm_requests"] == 3  # the slow one tried twice (max_retries=1), the good one once
    np.testing.assert_allclose(out.scores, [1.0, 1.0])  # the failure takes the batch mean
    assert elapsed < 1.4  # two 0.5 s timeouts, not the server's 1.5 s answer


def test_503_then_success_is_retried(server):
    url, app = server
    out = _reward(url)(_images(1), ["flaky"])
    np.testing.assert_allclose(out.scores, [1.0])
    assert out.info == {"vlm_requests": 2.0, "vlm_unparsable": 0.0, "vlm_request_failures": 0.0}
    assert app.state.seen["flaky"] == 2


def test_no_server_at_all_is_a_counted_failure():
    from helpers.servers import free_port

    reward = make_reward("vlm_score", base_url=f"http://127.0.0.1:{free_port()}/v1", timeout=0.5, max_retries=1,
                         backoff=0.01, fallback=0.0)
    out = reward(_images(2), ["good-3", "good-4"])
    np.testing.assert_allclose(out.scores, [0.0, 0.0])
    assert out.info["vlm_request_failures"] == 2


def test_bad_configuration_is_rejected_early(tmp_path):
    with pytest.raises(RewardError, match=r"\{prompt\}"):
        make_reward("vlm_score", rubric="no placeholder here")
    with pytest.raises(RewardError, match="fallback"):
        make_reward("vlm_score", fallback="median")
    with pytest.raises(RewardError, match="rubric_file"):
        make_reward("vlm_score", rubric_file=str(tmp_path / "missing.txt"))

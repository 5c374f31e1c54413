"""The VLM judge client against a real loopback server that plays a UnifiedReward judge:
good verdicts, garbage, missing <answer>, timeouts, 429 then success, the request format."""

import asyncio
import json

import numpy as np
import pytest
from helpers.servers import chat_app, decode_image, request_images, serve_app

from flowgrpo.rewards import RewardError, make_reward, vlm_judge
from flowgrpo.rewards.vlm_judge import VLMJudge, extract_caption, parse_flex, parse_think

THINK = ("<think>\n1. Semantic consistency:\n    Image 1 (8/10) - fine;\n    Image 2 (6/10) - less so\n"
         "Total score:\nImage 1: 8=8\nImage 2: 6=6\n</think>\n<answer>{}</answer>")


def fake_unifiedreward():
    """A scripted judge: the caption picks the behaviour; 'brighter' looks at the images.
    Returns the app and its log of request bodies."""

    async def answer(text, n, body):
        caption, _ = extract_caption(text)
        if caption == "slow":
            await asyncio.sleep(0.8)
        if caption == "busy" and n <= 2:
            return 429
        if caption == "broken":
            return 500
        if caption == "rejected":
            return 400
        if caption == "brighter":
            a, b = request_images(body)
            if a.mean() == 0 or b.mean() == 0:
                return "no idea"  # the judge cannot read black images: failures for those pairs
            return THINK.format("Image 1 is better" if a.mean() > b.mean() else "Image 2 is better")
        return {
            "pick one": THINK.format("Image 1 is better"),
            "pick two": THINK.format(" image 2 is better. "),
            "garbage": "Both pictures are lovely, I cannot decide.",
            "no answer": THINK.split("<answer>")[0],
            "two answers": THINK.format("Image 1 is better") + "<answer>Image 2 is better</answer>",
            "fuzzy": THINK.format("I think Image 1 is better"),
            "garbage once": "hmm" if n == 1 else THINK.format("Image 2 is better"),
            "busy": THINK.format("Image 1 is better"),
            "slow": THINK.format("Image 1 is better"),
            "flex": '```json\n{"prompt": "flex", "categories": [], "reason": "r", "winner": "Image 2"}\n```',
        }.get(caption)

    return chat_app(answer, key=lambda text: extract_caption(text)[0])


@pytest.fixture(scope="module")
def server():
    app, log = fake_unifiedreward()
    with serve_app(app) as url:
        yield url + "/v1", app.state.seen, log, app.state.headers


def make_judge(url, **kw):
    args = {"base_url": url, "model": "UnifiedReward", "timeout": 5.0, "max_retries": 2, "backoff": 0.01,
            "parse_retries": 2}
    args.update(kw)
    return VLMJudge(**args)


def pair(n=1):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_parsers_are_strict():
    assert parse_think("<think>x</think><answer>Image 1 is better</answer>") == 1.0
    assert parse_think("<answer>\n image 2 IS better.\n</answer>") == 0.0
    assert parse_think("<answer>Both images are equally good</answer>") == 0.5
    for bad in (None, "", "Image 1 is better", "<answer>Image 3 is better</answer>",
                "<answer>Image 1 is better</answer><answer>Image 1 is better</answer>",
                "<answer>Image 1 is better, clearly</answer>", "<answer>Image 1 is better"):
        assert parse_think(bad) is None, bad
    assert parse_flex('{"winner": "Image 1"}') == 1.0
    assert parse_flex('text ```json\n{"categories": [], "winner": "image 2 is better"}\n```') == 0.0
    assert parse_flex('{"winner": "Tie"}') == 0.5
    for bad in ('{"winner": "Image 1/2"}', '{"winner": 1}', "{not json}", "no json", '["Image 1"]'):
        assert parse_flex(bad) is None, bad
    assert extract_caption("The caption is: 「a \"quoted\" cat」.\nMore") == ('a "quoted" cat', "think")
    assert extract_caption("intro\nPrompt: [two dogs]\nrest") == ("two dogs", "flex")
    assert extract_caption("no caption here") is None


def test_good_verdicts_and_the_request_format(server):
    url, _, log, headers = server
    a, b = pair(2)
    judge = make_judge(url, api_key="sekrit")
    res = judge.judge(["pick one", "pick two"], a, b)
    np.testing.assert_array_equal(res.probs, [1.0, 0.0])
    assert not res.failed.any()
    assert res.info["requests"] == 2 and res.info["parse_failures"] == 0 and res.info["reasks"] == 0
    i = next(i for i, bd in enumerate(log) if "「pick one」" in bd["messages"][0]["content"][2]["text"])
    body = log[i]
    assert headers[i]["authorization"] == "Bearer sekrit"
    assert body["model"] == "UnifiedReward" and body["temperature"] == 0.0
    (msg,) = body["messages"]
    assert msg["role"] == "user"
    img1, img2, text = msg["content"]
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in (img1, img2))
    np.testing.assert_array_equal(decode_image(img1), a[0])  # Image 1 first, lossless
    np.testing.assert_array_equal(decode_image(img2), b[0])
    for needle in ("<think>", "<answer>", "Image 1 is better", "Image 2 is better", "1 to 10",
                   "Semantic consistency", "Aesthetics", "Authenticity"):
        assert needle in text["text"]


@pytest.mark.parametrize("caption", ["garbage", "no answer", "two answers", "fuzzy"])
def test_garbage_is_retried_a_bounded_number_of_times_then_a_failure(server, caption):
    url, seen, _, _ = server
    before = seen[caption]
    res = make_judge(url, parse_retries=2).judge([caption], *pair())
    assert res.failed.tolist() == [True] and res.probs[0] == 0.5
    assert seen[caption] - before == 3  # first ask + 2 re-asks
    assert res.info["parse_failures"] == 1 and res.info["reasks"] == 2


def test_a_reask_at_higher_temperature_can_recover(server):
    url, _, log, _ = server
    judge = make_judge(url, retry_temperature=0.9)
    res = judge.judge(["garbage once"], *pair())
    assert res.probs[0] == 0.0 and not res.failed[0]
    assert res.info["reasks"] == 1 and res.info["parse_failures"] == 0
    temps = [bd["temperature"] for bd in log if "「garbage once」" in bd["messages"][0]["content"][2]["text"]]
    assert temps == [0.0, 0.9]
    assert judge.last_failures == []


def test_429_then_success(server):
    url, _, _, _ = server
    res = make_judge(url, max_retries=3).judge(["busy"], *pair())
    assert res.probs[0] == 1.0 and not res.failed[0]
    assert res.info["retries"] == 2 and res.info["http_failures"] == 0


def test_timeouts_server_errors_and_rejections_are_failures_not_crashes(server):
    url, seen, _, _ = server
    before = dict(seen)
    judge = make_judge(url, timeout=0.2, max_retries=1)
    res = judge.judge(["slow", "broken", "rejected", "pick one"], *pair(4))
    assert res.failed.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(res.probs, [0.5, 0.5, 0.5, 1.0])
    assert res.info["http_failures"] == 3 and res.info["parse_failures"] == 0
    assert seen["broken"] - before.get("broken", 0) == 2  # retried once
    assert seen["rejected"] - before.get("rejected", 0) == 1  # a 400 is not retried
    assert any("Timeout" in f for f in judge.last_failures)
    assert any("HTTP 500" in f for f in judge.last_failures)


def test_flex_format(server):
    url, _, log, _ = server
    res = make_judge(url, format="flex").judge(["flex"], *pair())
    assert res.probs[0] == 0.0 and not res.failed[0]
    text = next(bd for bd in log if "Prompt: [flex]" in bd["messages"][0]["content"][2]["text"])
    assert '"winner"' in text["messages"][0]["content"][2]["text"]


def test_win_rates_through_the_vlm_judge_count_failures_as_ties(server, monkeypatch):
    url, _, _, _ = server
    encoded = []
    real_encode = vlm_judge.image_to_data_url
    monkeypatch.setattr(vlm_judge, "image_to_data_url", lambda img, fmt: encoded.append(1) or real_encode(img, fmt))
    levels = [40, 200, 0, 120]  # image 2 is black: the fake judge answers garbage for its pairs
    imgs = np.stack([np.full((8, 8, 3), v, np.uint8) for v in levels])
    reward = make_reward("pref_winrate", judge="vlm", both_orders=True,
                         judge_args={"base_url": url, "timeout": 5.0, "backoff": 0.01, "parse_retries": 1})
    out = reward(imgs, ["brighter"] * 4, group_ids=np.zeros(4))
    # Non-black images ranked by brightness; every pair with image 2 is a tie.
    np.testing.assert_allclose(out.scores, [(0 + 0.5 + 0) / 3, (1 + 0.5 + 1) / 3, 0.5, (0 + 0.5 + 1) / 3])
    assert out.info["judge_calls"] == 12 and out.info["failures"] == 6
    assert out.info["judge_parse_failures"] == 6 and out.info["judge_reasks"] == 6
    assert out.info["first_wins_share"] == 0.5
    assert len(encoded) == 4  # each image encoded once, not once per request


def test_bad_judge_arguments():
    with pytest.raises(RewardError, match="format"):
        VLMJudge(format="pointwise")
    with pytest.raises(RewardError, match="{prompt}"):
        VLMJudge(instruction="compare these")
    with pytest.raises(RewardError, match="NO_SUCH_VAR"):
        VLMJudge(api_key_env="NO_SUCH_VAR")
    custom = VLMJudge(instruction="Caption 「{prompt}」, answer in <answer></answer>.")
    a, b = pair()
    messages = custom.messages("a cat", a[0], b[0])
    assert messages[0]["content"][2]["text"] == "Caption 「a cat」, answer in <answer></answer>."
    json.dumps(messages)  # the request body is plain JSON

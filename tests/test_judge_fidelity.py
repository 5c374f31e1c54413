"""Judges: the official request options (JPEG at quality 95, max tokens, no
temperature), the lenient official answer parsers beside the strict ones, prompt templates
read from a user's file and sent verbatim, UniGenBench's official answer format with
first-block semantics, fresh single-turn retries and --testpoints for the Aug-2025 CSV.
Everything talks to real loopback servers (tests/helpers/servers.py)."""

from __future__ import annotations

import base64
import collections
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import SYNTHETIC_UNIGENBENCH_ROWS, write_unigenbench_csv
from helpers.servers import chat_app, serve_app
from PIL import Image

from flowgrpo.chat import ChatConfig
from flowgrpo.eval.benchmarks import Benchmark, EvalError, load_unigenbench_csv
from flowgrpo.eval.generate import adopt
from flowgrpo.eval.unigenbench import JudgeRequest, UniGenBenchJudge, score_run
from flowgrpo.eval.unigenbench_protocol import (ScorerPrompt, VerdictError, parse_scores,
                                                parse_scores_official)
from flowgrpo.rewards import RewardError, make_reward
from flowgrpo.rewards.vlm_judge import (TIE_ANSWER, VLMJudge, parse_flex, parse_flex_official, parse_think,
                                        parse_think_official)

GOOD = "<think>both fine</think><answer>Image 1 is better</answer>"


def payload(part: dict) -> tuple[str, bytes]:
    header, data = part["image_url"]["url"].split(",", 1)
    return header, base64.b64decode(data)


def encoded(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---- request options -------------------------------------------------------------------------------
def test_pairwise_judge_sends_jpeg_95_max_tokens_and_no_temperature_when_asked():
    app, log = chat_app(lambda text, n, body: GOOD)
    a, b = noise(1), noise(1, seed=1)
    with serve_app(app) as url:
        official = VLMJudge(base_url=url + "/v1", image_format="JPEG", max_tokens=4096, temperature=None,
                            timeout=5, backoff=0.01)
        res = official.judge(["a cat"], a, b)
        default = VLMJudge(base_url=url + "/v1", timeout=5, backoff=0.01)
        default.judge(["a cat"], a, b)
    assert res.probs.tolist() == [1.0] and not res.failed.any()
    body, plain = log
    assert body["max_tokens"] == 4096 and "temperature" not in body
    (h1, jpg1), (h2, jpg2) = payload(body["messages"][0]["content"][0]), payload(body["messages"][0]["content"][1])
    assert h1 == h2 == "data:image/jpeg;base64"
    assert jpg1 == encoded(a[0], "JPEG", quality=95) and jpg2 == encoded(b[0], "JPEG", quality=95)
    assert jpg1 != encoded(a[0], "JPEG")  # not Pillow's default quality 75
    # The defaults are unchanged: lossless PNG, 2048 tokens, temperature 0.
    assert plain["max_tokens"] == 2048 and plain["temperature"] == 0.0
    header, png = payload(plain["messages"][0]["content"][0])
    assert header == "data:image/png;base64"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), a[0])
    with pytest.raises(RewardError, match="image_quality"):
        VLMJudge(image_format="JPEG", image_quality=0)
    with pytest.raises(RewardError, match="parser"):
        VLMJudge(parser="lenient")


def test_options_reach_the_request_through_reward_args_of_a_training_config(tmp_path):
    """reward.args of a training config are the constructor kwargs, as the trainer builds them."""
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig

    app, log = chat_app(lambda text, n, body: "<answer>I'd say Image 2 is better</answer>")
    with serve_app(app) as url:
        cfg_file = tmp_path / "judge.yaml"
        cfg_file.write_text(
            "reward:\n  weights: {pref_winrate: 1.0}\n  args:\n    pref_winrate:\n      judge: vlm\n"
            f"      judge_args: {{base_url: '{url}/v1', image_format: JPEG, image_quality: 90, max_tokens: 4096,\n"
            "                   temperature: null, parser: official, parse_retries: 0, backoff: 0.01}\n")
        cfg = load_config(TrainConfig, cfg_file)
        reward = make_reward("pref_winrate", **dict(cfg.reward.args["pref_winrate"]))
        out = reward(noise(2), ["two dogs"] * 2, group_ids=np.zeros(2))
    assert out.scores.tolist() == [0.0, 1.0]  # the lenient parser reads the verdict inside the sentence
    (body,) = log
    assert body["max_tokens"] == 4096 and "temperature" not in body
    assert payload(body["messages"][0]["content"][0])[1] == encoded(noise(2)[0], "JPEG", quality=90)


def test_pointwise_vlm_score_request_options_and_template_file(tmp_path):
    app, log = chat_app(lambda text, n, body: "Alignment fine.\nFinal Score: 4")
    tpl = tmp_path / "rubric.txt"
    tpl.write_text("  Rate the picture for 「{prompt}」 {{not a placeholder}}\n\tFinal Score: X\n")
    img = noise(1, seed=3)
    with serve_app(app) as url:
        reward = make_reward("vlm_score", base_url=url + "/v1", image_format="JPEG", max_tokens=4096,
                             temperature=None, template_file=str(tpl), timeout=5, backoff=0.01)
        out = reward(img, ["a red {prompt} cube"])
    assert out.scores.tolist() == [0.8]
    (body,) = log
    assert body["max_tokens"] == 4096 and "temperature" not in body
    image, text = body["messages"][0]["content"]
    assert payload(image) == ("data:image/jpeg;base64", encoded(img[0], "JPEG", quality=95))
    # Verbatim: leading spaces, tabs, doubled braces (plain syntax) and a caption holding "{prompt}".
    assert text["text"] == "  Rate the picture for 「a red {prompt} cube」 {{not a placeholder}}\n\tFinal Score: X\n"
    with pytest.raises(RewardError, match="template_file: cannot read"):
        make_reward("vlm_score", template_file=str(tmp_path / "missing.txt"))


# ---- parsers ---------------------------------------------------------------------------------------
THINK_CASES = [  # answer, strict, official
    ("<think>x</think><answer>Image 1 is better</answer>", 1.0, 1.0),
    ("<answer>\n image 2 IS better.\n</answer>", 0.0, None),  # official: case-sensitive substring
    ("<answer>I think Image 1 is better</answer>", None, 1.0),  # official: substring
    ("<answer>Image 2 is better</answer> later <answer>Image 1 is better</answer>", None, 0.0),  # first block
    ("<answer>Image 1 is better. Image 2 is better</answer>", None, 1.0),  # "Image 1" is tested first
    ("<ANSWER>Image 1 is better</ANSWER>", 1.0, None),  # official tags are case-sensitive
    ("<think>Image 1 is better</think>", None, None),  # no <answer>: the official calls it a tie
    ("<answer>They are equally bad</answer>", None, None),  # no verdict: the official calls it a tie
    ("<answer></answer>", None, None),
    (f"<answer>{TIE_ANSWER}</answer>", 0.5, 0.5),  # the tie extension
    ("", None, None),
    (None, None, None),
]
FLEX_CASES = [
    ('{"winner": "Image 1"}', 1.0, 1.0),
    ('Sure. ```json\n{"categories": [], "winner": "Image 2"}\n``` done', 0.0, 0.0),
    ('{"winner": "Image 1 is clearly better"}', None, 1.0),
    ('{"winner": "Video 2"}', None, 0.0),
    ('{"winner": "image 1 and image 2 alike"}', None, None),
    ('{"winner": "Tie"}', 0.5, 0.5),
    ('{"reason": "no winner"}', None, None),
    ('["Image 1"]', None, None),
    ("not json at all", None, None),
]


@pytest.mark.parametrize("text,strict,official", THINK_CASES)
def test_think_parsers_on_handwritten_answers(text, strict, official):
    assert parse_think(text) == strict
    assert parse_think_official(text) == official


@pytest.mark.parametrize("text,strict,official", FLEX_CASES)
def test_flex_parsers_on_handwritten_answers(text, strict, official):
    assert parse_flex(text) == strict
    assert parse_flex_official(text) == official


def test_official_parser_still_counts_nonsense_as_a_failure_never_a_silent_score():
    answers = {"fuzzy": "<answer>I think Image 2 is better</answer>", "nonsense": "What a lovely pair of images!",
               "unsure": "<answer>Hard to say</answer>"}
    app, log = chat_app(lambda text, n, body: next(v for k, v in answers.items() if f"「{k}」" in text))
    with serve_app(app) as url:
        strict = VLMJudge(base_url=url + "/v1", parse_retries=1, timeout=5, backoff=0.01)
        lenient = VLMJudge(base_url=url + "/v1", parser="official", parse_retries=1, timeout=5, backoff=0.01)
        a, b = noise(3), noise(3, seed=1)
        rs = strict.judge(list(answers), a, b)
        rl = lenient.judge(list(answers), a, b)
        reward = make_reward("pref_winrate", judge=VLMJudge(base_url=url + "/v1", parser="official",
                                                            parse_retries=0, timeout=5, backoff=0.01))
        out = reward(noise(3), ["nonsense"] * 3, group_ids=np.zeros(3))
    assert rs.failed.tolist() == [True, True, True] and rs.info["parse_failures"] == 3
    assert rl.probs.tolist() == [0.0, 0.5, 0.5] and rl.failed.tolist() == [False, True, True]
    assert rl.info["parse_failures"] == 2 and rl.info["reasks"] == 2
    assert any("What a lovely pair" in f for f in lenient.last_failures)
    # In a reward: every pair failed, so all ties, and the failures are in the counters.
    assert out.scores.tolist() == [0.5, 0.5, 0.5]
    assert out.info["failures"] == 3 and out.info["judge_parse_failures"] == 3 and out.info["judge_requests"] == 3


# ---- templates -------------------------------------------------------------------------------------
def test_pairwise_template_file_reaches_the_request_verbatim(tmp_path):
    app, log = chat_app(lambda text, n, body: GOOD)
    plain = tmp_path / "think.txt"
    plain.write_text("Caption: 「{prompt}」\n    indented line, {other} stays\n<answer>?</answer>", encoding="utf-8")
    fmt = tmp_path / "flex.json"
    fmt.write_text(json.dumps({"template": 'Prompt: [{prompt}]\nAnswer {{"winner": "Image 1"}}', "syntax": "format"}))
    a, b = noise(2)[:1], noise(2)[1:]
    with serve_app(app) as url:
        VLMJudge(base_url=url + "/v1", template_file=str(plain), timeout=5).judge(["a {prompt} cat"], a, b)
        VLMJudge(base_url=url + "/v1", format="flex", template_file=str(fmt), parse_retries=0,
                 timeout=5).judge(["two dogs"], a, b)
    texts = [body["messages"][0]["content"][2]["text"] for body in log]
    assert texts[0] == "Caption: 「a {prompt} cat」\n    indented line, {other} stays\n<answer>?</answer>"
    assert texts[1] == 'Prompt: [two dogs]\nAnswer {"winner": "Image 1"}'  # str.format: {{ -> {
    bad = tmp_path / "bad.txt"
    bad.write_text("no caption placeholder")
    with pytest.raises(RewardError, match=r"\{prompt\}"):
        VLMJudge(template_file=str(bad))
    bad.write_text("{caption} {prompt}")
    with pytest.raises(RewardError, match=r"unknown placeholder.*caption"):
        VLMJudge(template_file=str(bad), template_syntax="format")
    with pytest.raises(RewardError, match="not both"):
        VLMJudge(template_file=str(plain), instruction="x {prompt}")
    (tmp_path / "nokey.json").write_text('{"text": "{prompt}"}')
    with pytest.raises(RewardError, match='"template" string'):
        VLMJudge(template_file=str(tmp_path / "nokey.json"))


def _ugb_app(answer):
    """A UniGenBench judge: the prompt sits between <<< and >>> in every template used here."""
    def reply(text, n, body):
        prompt = re.search(r"<<<(.*?)>>>|<prompt>(.*?)</prompt>", text, re.S)
        return answer(prompt.group(1) or prompt.group(2), n, body)
    return chat_app(reply)


def _png(path: Path, seed=0) -> Path:
    Image.fromarray(noise(1, seed=seed)[0]).save(path)
    return path


def test_unigenbench_template_file_with_definitions_reaches_the_request_verbatim(tmp_path):
    app, log = _ugb_app(lambda p, n, body: "<analysis>['a', 'b']</analysis><score>[1, 0]</score>")
    spec = {"template": "Judge <<<{prompt}>>> on {testpoint}.\n{explanation}\n{test_explanation}\nEnd.",
            "definitions": {"Style": "my style rule", "Text Generation": "my text rule"},
            "definitions_header": "DEFS", "descriptions_header": "DESCS"}
    (tmp_path / "ugb.json").write_text(json.dumps(spec))
    req = JudgeRequest("7_0.png", _png(tmp_path / "7_0.png"), "a sign saying HI", ["Style", "Text Generation"],
                       ["flat poster", "HI"])
    prompt = ScorerPrompt.from_file(tmp_path / "ugb.json")
    with serve_app(app) as url:
        cfg = ChatConfig(base_url=url + "/v1", model="m", timeout=5, max_retries=0, max_tokens=4096,
                         temperature=None)
        (v,) = UniGenBenchJudge(cfg, image_format="JPEG", parser="official", prompt=prompt).judge([req])
    assert v.scores == [1, 0] and v.protocol == prompt.protocol + "/official"
    (body,) = log
    image, text = body["messages"][0]["content"]
    assert text["text"] == ("Judge <<<a sign saying HI>>> on ['Style', 'Text Generation'].\n"
                            "DEFS:\u300c\nStyle: my style rule\nText Generation: my text rule\n\u300d\n"
                            "DESCS:\u300c\nStyle: flat poster\nText Generation: HI\n\u300d\nEnd.")
    rgb = np.asarray(Image.open(tmp_path / "7_0.png").convert("RGB"))
    assert payload(image) == ("data:image/jpeg;base64", encoded(rgb, "JPEG", quality=95))
    assert body["max_tokens"] == 4096 and "temperature" not in body
    # Definitions must cover every testpoint; unknown keys and placeholders are refused.
    with pytest.raises(EvalError, match="lack testpoint"):
        prompt.text("p", ["Style", "Attribute - Color"], ["x", "red"])
    (tmp_path / "extra.json").write_text(json.dumps({**spec, "definition": {}}))
    with pytest.raises(EvalError, match="unknown key"):
        ScorerPrompt.from_file(tmp_path / "extra.json")
    (tmp_path / "fmt.txt").write_text("{prompt} {checkpoints}")
    with pytest.raises(EvalError, match="unknown placeholder"):
        ScorerPrompt.from_file(tmp_path / "fmt.txt", syntax="format")


# ---- UniGenBench answers ------------------------------------------------------------------------------
OFFICIAL = ("<description>\n    <prompt>a sign</prompt>\n    <checkpoint>['Style', 'Text Generation']</checkpoint>\n"
            "    <analysis>['flat, as asked', \"no 'HI' visible\"]</analysis>\n"
            "    <score>[1, 0]</score>\n</description>")


def test_unigenbench_official_format_first_block_semantics():
    assert parse_scores_official(OFFICIAL, 2) == [1, 0]
    assert parse_scores(OFFICIAL, 2) == [1, 0]  # the strict parser reads the official format too
    two = OFFICIAL + OFFICIAL.replace("[1, 0]", "[1, 1]")
    assert parse_scores_official(two, 2) == [1, 0]  # the first block
    assert parse_scores(two, 2) == [1, 1]  # the last block
    thought = "<think><analysis>['x', 'y']</analysis><score>[0, 0]</score></think>" + OFFICIAL
    assert parse_scores_official(thought, 2) == [0, 0]  # first block, even inside <think>
    assert parse_scores(thought, 2) == [1, 0]  # <think> is skipped
    assert parse_scores_official(OFFICIAL.replace("[1, 0]", "[True, 0.0]"), 2) == [1, 0]
    for text, why in [
        (OFFICIAL.replace("<analysis>['flat, as asked', \"no 'HI' visible\"]</analysis>", ""), "no <analysis>"),
        (OFFICIAL.replace("score>", "SCORE>"), "no <score>"),
        (OFFICIAL.replace("[1, 0]", "[1, 0, 1]"), "first <score> 3"),
        (OFFICIAL.replace("[1, 0]", "[1, 2]"), "would count it as 0"),
        (OFFICIAL.replace("[1, 0]", "['1', 0]"), "would count it as 0"),
        (OFFICIAL.replace("[1, 0]", "yes, no"), "not a Python list literal"),
        (OFFICIAL.replace("[1, 0]", "1"), "not a list"),
        ("I like it.", "no <analysis> and no <score>"),
    ]:
        with pytest.raises(VerdictError, match=re.escape(why)):
            parse_scores_official(text, 2)


def test_fresh_single_turn_retries_up_to_the_official_count(tmp_path):
    def answer(prompt, n, body):
        if prompt == "NEVER":
            return "no idea"
        if prompt == "THIRD":  # right at the third question (and the sixth: the second run)
            return OFFICIAL if n % 3 == 0 else "<score>[1]</score>"
        if prompt == "BROKEN":
            return 500
        return OFFICIAL

    app, log = _ugb_app(answer)
    img = _png(tmp_path / "x.png")
    reqs = [JudgeRequest(f"{k}_0.png", img, p, ["Style", "Text Generation"], ["flat", "HI"])
            for k, p in enumerate(["NEVER", "THIRD", "BROKEN", "GOOD"])]
    with serve_app(app) as url:
        cfg = ChatConfig(base_url=url + "/v1", model="m", timeout=5, max_retries=0, backoff=0.01)
        never, third, broken, good = UniGenBenchJudge(cfg, parse_retries=10, retry_style="fresh",
                                                      parser="official").judge(reqs)
        fresh_log = list(log)
        log.clear()
        corrected = UniGenBenchJudge(cfg, parse_retries=10, parser="official").judge(reqs[:3])
    questions = [b["messages"][0]["content"][1]["text"] for b in fresh_log]
    asked = collections.Counter(re.search(r"<prompt>(.*?)</prompt>", q).group(1) for q in questions)
    assert asked == {"NEVER": 11, "THIRD": 3, "BROKEN": 11, "GOOD": 1}
    assert all(len(b["messages"]) == 1 for b in fresh_log)  # always a fresh single-turn question
    assert len({q for q in questions if "NEVER" in q}) == 1  # the same question every time
    assert never.scores is None and never.asks == 11 and "after 11 fresh attempts" in never.error
    assert "unparsable answer" in never.error and never.answer == "no idea"
    assert third.scores == [1, 0] and third.asks == 3 and third.attempts == 3
    assert broken.scores is None and broken.error.startswith("request failed") and broken.asks == 11
    assert good.scores == [1, 0] and good.asks == 1
    # The default style corrects within one conversation, and a failed request ends it at once.
    c_never, c_third, c_broken = corrected
    assert c_never.asks == 11 and max(len(b["messages"]) for b in log) == 21
    assert c_third.scores == [1, 0] and c_third.asks == 3
    assert c_broken.asks == 1 and c_broken.scores is None


# ---- --testpoints --------------------------------------------------------------------------------------
def _aug_variant(tmp_path: Path) -> tuple[Path, Path]:
    """Prompt rows in the shipped (Oct-2025) file's layout, and the same rows with index 428's
    Logical Reasoning testpoint restored, as the Aug-2025 file has it."""
    rows = [list(r) for r in SYNTHETIC_UNIGENBENCH_ROWS]
    oct_csv = write_unigenbench_csv(tmp_path / "test_prompts_en.csv", rows)
    assert rows[2][0] == "428" and rows[2][2] == ["Style"]
    rows[2] = ["428", rows[2][1], ["Style", "Logical Reasoning"], rows[2][3] + ["STAND-IN"]]
    return oct_csv, write_unigenbench_csv(tmp_path / "test_prompts_en_aug2025.csv", rows)


def test_testpoints_option_scores_against_the_aug_2025_file(tmp_path, capsys):
    from flowgrpo.cli import main

    csv, aug = _aug_variant(tmp_path)
    oct_items, aug_items = load_unigenbench_csv(csv), load_unigenbench_csv(aug)
    assert sum(len(i.metadata["testpoints"]) for i in oct_items) + 1 == sum(len(i.metadata["testpoints"])
                                                                           for i in aug_items)
    items = [i for i in oct_items if i.key in ("0", "428")]
    run = tmp_path / "run"
    run.mkdir()
    for it in items:
        _png(run / f"{it.key}_0.png", seed=int(it.key))
    adopt(Benchmark("unigenbench", str(csv), items, 1), run, images_per_prompt=1, label="fake")

    def answer(prompt, n, body):
        k = len(re.findall(r"^\d+\. ", body["messages"][0]["content"][1]["text"], re.M))
        return "<score>[" + ", ".join(["1"] * k) + "]</score>"

    app, log = _ugb_app(answer)
    with serve_app(app) as url:
        base = ["eval", "score", str(run), "--judge-url", url + "/v1", "--judge-model", "m", "--quiet",
                "--max-tokens", "4096", "--temperature", "none", "--image-format", "JPEG"]
        assert main(base) == 0
        first = json.loads((run / "scores" / "unigenbench" / "scores.json").read_text())
        assert main(base + ["--testpoints", str(aug)]) == 0
        second = json.loads((run / "scores" / "unigenbench" / "scores.json").read_text())
        shown = capsys.readouterr().out
        wrong = tmp_path / "wrong.csv"
        wrong.write_text(aug.read_text(encoding="utf-8").replace("a young sailor", "an old sailor"))
        assert main(base + ["--testpoints", str(wrong)]) == 2
    assert "another prompt than the run" in capsys.readouterr().err
    assert len(log) == 3  # the second pass asks only about the image whose testpoints changed
    assert "Logical Reasoning" in log[2]["messages"][0]["content"][1]["text"]
    assert all(b["max_tokens"] == 4096 and "temperature" not in b for b in log)
    assert first["testpoints_judged"] == 3 + 1 and first["testpoints_changed"] == []
    assert second["testpoints_judged"] == 3 + 2 and second["testpoints_changed"] == ["428"]
    assert second["primary"]["Logical Reasoning"]["judged"] == 1 and "Logical Reasoning" in first["missing_primaries"]
    assert second["protocol"]["image_format"] == "JPEG" and second["protocol"]["temperature"] is None
    assert "prompts whose testpoints differ from the run's: 428" in shown
    # A protocol change (here the parser) asks again instead of reusing verdicts of another protocol.
    assert score_run(run, ChatConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout=0.2, max_retries=0),
                     parser="official", testpoints=aug, progress=False)["failed_images"] == 2

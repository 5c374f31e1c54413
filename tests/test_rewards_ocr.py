"""OCR reward: the Flow-GRPO formula, and both offline backends reading text drawn with PIL."""

import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from flowgrpo.rewards import RewardError, make_reward
from flowgrpo.rewards.ocr import OcrReward, ocr_distance, ocr_score, ocr_target


def render(text: str, size=(320, 128), font_size=30) -> np.ndarray:
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((12, size[1] // 2 - font_size // 2), text, fill="black", font=ImageFont.load_default(size=font_size))
    return np.asarray(img)


# ----------------------------------------------------------------------------- formula


def test_target_is_first_quoted_span_folded():
    assert ocr_target('A sign reading "Open Late" and "Closed"') == "openlate"
    assert ocr_target("a neon sign “Good Night”") == "goodnight"
    assert ocr_target("no quotes here") is None
    assert ocr_target('an unmatched " quote') is None
    assert ocr_target('empty "" quotes') is None
    assert ocr_target('blank "   " quotes') is None
    assert ocr_target('ignored "x"', {"ocr_text": "Metadata Wins"}) == "metadatawins"


def test_formula_edge_cases():
    assert ocr_score("Hello World", "HELLO world") == 1.0  # case and spaces folded
    assert ocr_score("cat", "a big cat here") == 1.0  # containment: extra text is free
    assert ocr_score("hello", "hallo") == pytest.approx(0.8)  # one substitution in five
    assert ocr_score("hello", "") == 0.0  # nothing read: d = len(target)
    # Long garbage: Levenshtein is 20 but d is capped at len(target), so the floor is 0, not negative.
    assert ocr_distance("abc", "x" * 20) == 3
    assert ocr_score("abc", "x" * 20) == 0.0
    with pytest.raises(ValueError):
        ocr_score("  ", "anything")


class _FakeBackend:
    name = "fake"

    def __init__(self, texts):
        self.texts = list(texts)

    def __call__(self, image):
        text = self.texts.pop(0)
        if isinstance(text, Exception):
            raise text
        return text


def test_no_target_and_backend_failure_are_counted_not_raised():
    reward = OcrReward(_FakeBackend(["Helo", RuntimeError("engine crashed")]), no_target_score=-1.0)
    assert reward.name == "ocr_fake"
    images = np.zeros((4, 8, 8, 3), np.uint8)
    out = reward(images, ['say "hello"', "no quotes", 'say ""', 'say "hello"'])
    np.testing.assert_allclose(out.scores, [0.8, -1.0, -1.0, 0.0])
    assert out.info == {"ocr_no_target": 2.0, "ocr_failures": 1.0}
    np.testing.assert_array_equal(out.components["ocr_distance"][[0, 3]], [1, 5])
    assert np.isnan(out.components["ocr_distance"][[1, 2]]).all()


def test_unknown_and_missing_backends_give_clear_errors():
    with pytest.raises(RewardError, match="unknown OCR backend"):
        make_reward("ocr", backend="easyocr")
    try:
        import paddleocr  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(RewardError, match=r"pip install 'flowgrpo\[paddleocr\]'"):
            make_reward("ocr", backend="paddleocr")


# ----------------------------------------------------------------------------- real backends


def _backend_or_skip(name):
    if name == "tesseract" and shutil.which("tesseract") is None:
        pytest.skip("tesseract binary not installed (apt-get install tesseract-ocr)")
    return make_reward("ocr", backend=name)


@pytest.fixture(scope="module", params=["rapidocr", "tesseract"])
def reward(request):
    return _backend_or_skip(request.param)


def test_real_backend_exact_near_miss_and_blank(reward):
    images = np.stack([
        render("Hello World"),  # exact
        render("Hello World 2024"),  # target contained in longer text
        render("Hello Wrld"),  # near miss: one deletion out of 10 letters
        render(""),  # nothing to read
    ])
    prompts = ['a sign that says "Hello World"'] * 4
    out = reward(images, prompts)
    assert reward.recognised[:3] == ["helloworld", "helloworld2024", "hellowrld"], reward.recognised
    np.testing.assert_allclose(out.scores, [1.0, 1.0, 0.9, 0.0])
    np.testing.assert_array_equal(out.components["ocr_exact"], [1, 1, 0, 0])
    assert out.info["ocr_failures"] == 0


def test_real_backend_wrong_word_scores_low(reward):
    out = reward(render("Goodbye")[None], ['a poster with "Welcome"'])
    # "goodbye" vs "welcome": far apart, d capped at 7, so the score is near 0.
    assert 0.0 <= out.scores[0] <= 0.3

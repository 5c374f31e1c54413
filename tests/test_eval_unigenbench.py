"""UniGenBench: the real prompt CSV, the 27 -> 10 mapping, strict verdict parsing, pooled
aggregation against published numbers, the judge against a real loopback server, resume."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA, write_unigenbench_csv
from helpers.servers import chat_app, request_images, serve_app
from PIL import Image

from flowgrpo.chat import ChatConfig
from flowgrpo.eval.benchmarks import (PRIMARY_DIMENSIONS, SUBDIMENSIONS, Benchmark, EvalError, load_benchmark,
                                      load_unigenbench_csv, primary_of, subdimension_map)
from flowgrpo.eval.generate import adopt, load_manifest
from flowgrpo.eval.report import report
from flowgrpo.eval.unigenbench import (VERDICTS, JudgeRequest, UniGenBenchJudge, VerdictError, aggregate,
                                       parse_scores, score_run)

CSV = SHARED_DATA / "unigenbench" / "test_prompts_en.csv"
needs_data = pytest.mark.skipif(not CSV.is_file(), reason=f"UniGenBench CSV not at {CSV}")


@pytest.fixture(scope="module")
def items():
    return load_benchmark("unigenbench", data_dir=SHARED_DATA).items


# ---- the prompt file -----------------------------------------------------------------------------
@needs_data
def test_real_csv_counts_and_mapping(items):
    assert len(items) == 600
    assert [it.key for it in items] == [str(i) for i in range(600)]
    counts = Counter(tp for it in items for tp in it.metadata["testpoints"])
    assert sum(counts.values()) == 1813
    assert set(counts) == set(SUBDIMENSIONS) and len(SUBDIMENSIONS) == 27
    mapping = subdimension_map()
    assert mapping["Attribute - Color"] == "Attribute"
    assert mapping["Entity Layout - Three-Dimensional Space"] == "Entity Layout"
    assert mapping["Text Generation"] == "Text" and mapping["Style"] == "Style"
    assert set(mapping.values()) == set(PRIMARY_DIMENSIONS) and len(PRIMARY_DIMENSIONS) == 10
    per_primary = Counter()
    for tp, n in counts.items():
        per_primary[primary_of(tp)] += n
    assert per_primary == {"Style": 250, "World Knowledge": 158, "Attribute": 234, "Action": 263,
                           "Relationship": 197, "Compound": 194, "Grammar": 187, "Entity Layout": 134,
                           "Logical Reasoning": 109, "Text": 87}
    first = items[0]
    assert first.metadata["testpoints"] == ["Style", "World Knowledge", "Attribute - Quantity"]
    assert first.metadata["descriptions"] == ["classical ink painting", "Egyptian pyramids", "two pandas"]


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _dims(points, descs) -> str:
    return '"' + json.dumps({"Testpoints": points, "Testpoint Description": descs}).replace('"', '""') + '"'


def test_csv_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(EvalError, match=r"missing column\(s\) \['sub_dims_en'\]"):
        load_unigenbench_csv(_write_csv(tmp_path / "a.csv", "index,prompt_en", ["0,a cat"]))
    bad_json = _write_csv(tmp_path / "b.csv", "index,prompt_en,sub_dims_en", ['3,a cat,"{not json"'])
    with pytest.raises(EvalError, match=r"row 1 \(index '3'\): sub_dims_en is not valid JSON"):
        load_unigenbench_csv(bad_json)
    uneven = _write_csv(tmp_path / "c.csv", "index,prompt_en,sub_dims_en",
                        [f"0,a red cat,{_dims(['Style', 'Attribute - Color'], ['red'])}"])
    with pytest.raises(EvalError, match="one description per testpoint"):
        load_unigenbench_csv(uneven)
    unknown = _write_csv(tmp_path / "d.csv", "index,prompt_en,sub_dims_en",
                         [f"0,a cat,{_dims(['Attribute - Smell'], ['smelly'])}"])
    with pytest.raises(EvalError, match="unknown testpoint"):
        load_unigenbench_csv(unknown)
    assert load_unigenbench_csv(unknown, strict_testpoints=False)[0].metadata["testpoints"] == ["Attribute - Smell"]
    dup = _write_csv(tmp_path / "e.csv", "index,prompt_en,sub_dims_en",
                     [f"0,a cat,{_dims(['Style'], ['x'])}", f"0,a dog,{_dims(['Style'], ['y'])}"])
    with pytest.raises(EvalError, match="appears twice"):
        load_unigenbench_csv(dup)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWGRPO_DATA", raising=False)
    with pytest.raises(EvalError, match="needs the UniGenBench test CSV"):
        load_benchmark("unigenbench", data_dir=tmp_path / "nowhere")


@needs_data
def test_long_csv_broken_row_is_reported():
    # The published long-prompt file has one row whose JSON lacks a comma: we name it.
    with pytest.raises(EvalError, match=r"index '509'.*not valid JSON"):
        load_unigenbench_csv(SHARED_DATA / "unigenbench" / "test_prompts_en_long.csv")


# ---- parsing ------------------------------------------------------------------------------------
def test_parse_scores_is_strict():
    assert parse_scores("<analysis>['ok', 'no']</analysis>\n<score>[1, 0]</score>", 2) == [1, 0]
    assert parse_scores("<think>maybe <score>[0]</score></think><score>[1]</score>", 1) == [1]
    assert parse_scores("<score>[0,1]</score> then <score>[1, 1]</score>", 2) == [1, 1]  # the last block
    for text, n, why in [("<score>[1, 0, 1]</score>", 2, "3 entries for 2"), ("no tags at all", 1, "no <score>"),
                         ("<score>[1, 2]</score>", 2, "integer 0 or 1"), ("<score>[true]</score>", 1, "integer"),
                         ("<score>['1']</score>", 1, "not a list of integers"), ("<score>1</score>", 1, "not a list")]:
        with pytest.raises(VerdictError, match=re.escape(why)):
            parse_scores(text, n)


# ---- aggregation ----------------------------------------------------------------------------------
# FLUX.1-dev on the English leaderboard, as first published (HF space CodeGoat24/UniGenBench_Leaderboard,
# commit d68eefe447cfd64d9619df3954f5879ceb427f68, leaderboard_data.json): overall 61.30.
FLUX1_DEV_SUB = {
    "Style": 83.90, "World Knowledge": 88.92,
    "Attribute - Quantity": 72.22, "Attribute - Expression": 53.85, "Attribute - Material": 58.96,
    "Attribute - Size": 75.00, "Attribute - Shape": 65.00, "Attribute - Color": 91.67,
    "Action - Hand (Character/Anthropomorphic)": 51.28, "Action - Full-body (Character/Anthropomorphic)": 67.39,
    "Action - Animal": 69.85, "Action - Non-contact Interaction": 59.69, "Action - Contact Interaction": 58.93,
    "Action - State": 65.57, "Compound - Imagination": 47.96, "Compound - Feature Matching": 46.09,
}
FLUX1_DEV_PRIMARY = {"Style": 83.90, "World Knowledge": 88.92, "Attribute": 67.84, "Action": 62.17,
                     "Compound": 47.04}


@needs_data
def test_pooled_primaries_reproduce_published_flux_numbers(items):
    """Synthetic verdicts: the 600 prompts x 4 images, sub-dimension d passing round(p_d * n_d)
    of its n_d = 4 x (CSV count) testpoints. Pooling reproduces FLUX.1-dev's published
    primaries; averaging the sub-dimensions would not (Attribute: 69.45, not 67.84)."""
    counts = Counter(tp for it in items for tp in it.metadata["testpoints"])
    quota = {d: round(p / 100 * 4 * counts[d]) for d, p in FLUX1_DEV_SUB.items()}
    verdicts = []
    for j in range(4):
        for it in items:
            tps = [tp for tp in it.metadata["testpoints"] if tp in quota]
            if not tps:
                continue
            scores = []
            for tp in tps:
                scores.append(int(quota[tp] > 0))
                quota[tp] -= 1
            verdicts.append({"testpoints": tps, "scores": scores})
    result = aggregate(verdicts)
    for d, p in FLUX1_DEV_SUB.items():
        assert round(result["sub"][d]["score"], 2) == p, d
    for p, v in FLUX1_DEV_PRIMARY.items():
        assert round(result["primary"][p]["score"], 2) == v, p
    attr = [FLUX1_DEV_SUB[d] for d in FLUX1_DEV_SUB if d.startswith("Attribute")]
    assert abs(np.mean(attr) - 67.84) > 1.5
    assert result["overall"] == pytest.approx(np.mean([v["score"] for v in result["primary"].values()]))


def test_overall_is_unweighted_mean_of_primaries_and_failures_counted():
    verdicts = [
        {"testpoints": ["Style", "Attribute - Color"], "scores": [1, 1]},
        {"testpoints": ["Attribute - Color", "Attribute - Shape", "Attribute - Shape"], "scores": [0, 0, 1]},
        {"testpoints": ["Style", "Text Generation"], "scores": None, "error": "unparsable answer"},
    ]
    r = aggregate(verdicts)
    assert r["primary"]["Style"]["score"] == 100.0
    assert r["primary"]["Attribute"]["score"] == pytest.approx(50.0)  # 2 of 4 pooled
    assert r["sub"]["Attribute - Shape"]["score"] == 50.0 and r["sub"]["Attribute - Color"]["score"] == 50.0
    assert r["overall"] == pytest.approx(75.0)  # (100 + 50) / 2, Text never judged
    assert (r["images"], r["judged_images"], r["failed_images"], r["failed_testpoints"]) == (3, 2, 1, 2)
    assert "Text" in r["missing_primaries"]
    # failures as 0: Style 1/2, Attribute 2/4, Text 0/1 -> (50 + 50 + 0) / 3
    assert r["overall_failures_as_zero"] == pytest.approx(100 / 3)


# ---- the judge against a real server ------------------------------------------------------------
def _judge_app(log: list):
    """A UniGenBench judge that logs (prompt, turns, image size, model) per request."""

    async def answer(text, n, body):
        n_points = len(re.findall(r"^\d+\. ", text, re.M))
        prompt = re.search(r"<prompt>(.*?)</prompt>", text, re.S).group(1)
        size = request_images(body)[0].shape[1::-1]
        log.append({"prompt": prompt, "turns": len(body["messages"]), "size": size, "model": body["model"]})
        if "SLOW" in prompt:
            await asyncio.sleep(2.0)
        if "MALFORMED" in prompt:
            return "The image looks fine to me."
        if "WRONG" in prompt and len(body["messages"]) == 1:
            return "<score>[" + ", ".join(["1"] * (n_points + 1)) + "]</score>"
        return "<analysis>[" + ", ".join(['"seen"'] * n_points) + "]</analysis>\n<score>[" + ", ".join(
            str(i % 2) for i in range(n_points)) + "]</score>"

    return chat_app(answer)[0]


def _png(path: Path, color=(200, 30, 30), size=16) -> Path:
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(path)
    return path


def test_judge_good_malformed_wrong_length_timeout(tmp_path):
    log: list = []
    img = _png(tmp_path / "x.png")
    tps = ["Style", "Attribute - Color", "Text Generation"]
    reqs = [JudgeRequest(f"{k}_0.png", img, f"{word} a red sign", tps, ["flat", "red", "STOP"])
            for k, word in enumerate(["GOOD", "MALFORMED", "WRONG", "SLOW"])]
    with serve_app(_judge_app(log)) as url:
        cfg = ChatConfig(base_url=url + "/v1", model="judge-x", timeout=0.5, max_retries=1, backoff=0.01)
        out = UniGenBenchJudge(cfg, parse_retries=2).judge(reqs)
    good, bad, wrong, slow = out
    assert good.scores == [0, 1, 0] and good.error is None and good.attempts == 1 and good.judge == "judge-x"
    assert bad.scores is None and "unparsable answer" in bad.error and "no <score>" in bad.error
    assert sum("MALFORMED" in e["prompt"] for e in log) == 3  # asked, then re-asked twice with the reason
    assert wrong.scores == [0, 1, 0] and wrong.attempts == 2  # wrong length, re-asked once, then right
    assert max(e["turns"] for e in log if "WRONG" in e["prompt"]) == 3
    assert slow.scores is None and slow.error.startswith("request failed") and "Timeout" in slow.error
    assert slow.attempts == 2  # the first try and one transport retry
    assert all(e["size"] == (16, 16) and e["model"] == "judge-x" for e in log)


# ---- a scoring run and its resume -------------------------------------------------------------------
def _fake_run(run: Path, items) -> None:
    """Images made elsewhere, adopted as a run (what scoring the published FLUX images needs)."""
    run.mkdir(parents=True, exist_ok=True)
    bench = Benchmark("unigenbench", "test", items, 4)
    with pytest.raises(EvalError, match="holds none of the expected images"):
        adopt(bench, run)
    for it in items:
        for j in range(2):
            _png(run / f"{it.key}_{j}.png", (10 * j, 100, 50))
    adopt(bench, run, images_per_prompt=2, label="fake")
    assert load_manifest(run)["settings"]["model"] == "external:fake"


def test_scoring_run_writes_outputs_and_resumes(tmp_path):
    items = load_unigenbench_csv(write_unigenbench_csv(tmp_path / "prompts.csv"))
    subset = [items[0], dataclasses.replace(items[1], prompt="MALFORMED " + items[1].prompt)]
    run = tmp_path / "run"
    _fake_run(run, subset)
    log: list = []
    with serve_app(_judge_app(log)) as url:
        cfg = ChatConfig(base_url=url + "/v1", model="judge-x", timeout=5, max_retries=0, backoff=0.01)
        first = score_run(run, cfg, parse_retries=1, progress=False)
        asked = len(log)
        again = score_run(run, cfg, parse_retries=1, progress=False)
        assert len(log) == asked  # a restart re-asks nothing, failures included
        assert again["overall"] == first["overall"] and again["asked_this_time"] == 0
        _png(run / f"{subset[0].key}_1.png", (0, 0, 255))  # a regenerated image is asked again
        score_run(run, cfg, parse_retries=1, progress=False)
        assert len(log) == asked + 1
        retried = score_run(run, cfg, parse_retries=1, retry_failures=True, progress=False)
        assert retried["asked_this_time"] == 2 and len(log) == asked + 1 + 2 * 2
    assert asked == 2 + 2 * 2  # two good images, two malformed ones asked twice each
    out = run / "scores" / "unigenbench"
    assert first["judged_images"] == 2 and first["failed_images"] == 2
    assert {f["image"] for f in first["failures"]} == {f"{subset[1].key}_0.png", f"{subset[1].key}_1.png"}
    verdict_lines = [ln for ln in (out / VERDICTS).read_text().splitlines() if ln.strip()]
    assert len(verdict_lines) == 4 + 1 + 2  # one line per verdict, appended
    md = (out / "scores.md").read_text()
    assert "**2 failed**" in md and "| Style |" in md
    primary_csv = (out / "primary.csv").read_text().splitlines()
    assert primary_csv[0] == "dimension,score,passed,judged" and primary_csv[-1].startswith("Overall,")
    # The good item (0): Style, World Knowledge, Attribute - Quantity answered [0, 1, 0] on both images.
    saved = json.loads((out / "scores.json").read_text())
    assert saved["primary"]["World Knowledge"]["score"] == 100.0 and saved["primary"]["Style"]["score"] == 0.0
    assert "Text" in saved["missing_primaries"]
    # The report puts UniGenBench runs side by side: primaries, sub-dimensions, failures.
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    md = report([run, twin], tmp_path / "rep", names=["a", "b"]).read_text()
    assert "## unigenbench" in md and "| World Knowledge | 100.00 | 100.00 | 0.00 |" in md
    assert "| · Attribute - Quantity |" in md and "| Failed images | 2 | 2 | 0 |" in md
    assert (tmp_path / "rep" / "chart_unigenbench.png").is_file()

"""Benchmark generation on a tiny random SD3 pipeline (resume, sharding, naming, settings
guard), reward scoring with resume, and the side-by-side report of two runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.pipelines import build_sd3_without_t5
from PIL import Image

from flowgrpo.eval.benchmarks import EvalError, load_benchmark
from flowgrpo.eval.generate import generate, image_seed, load_manifest
from flowgrpo.eval.report import report
from flowgrpo.eval.score import score


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_sd3_without_t5(tmp_path_factory.mktemp("tiny_sd3")))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


KW = dict(images_per_prompt=2, steps=3, guidance=2.0, limit=5, device="cpu", progress=False)


def test_generate_resumes_with_identical_images(tiny_model, tmp_path):
    out = tmp_path / "run"
    manifest_path = generate("shapes", tiny_model, out_dir=out, shard=(0, 1), batch_size=4, **KW)
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == sorted(f"{k}_{j}.png" for k in range(5) for j in range(2))
    man = json.loads(manifest_path.read_text())
    assert man["complete"] and man["images_done"] == 10 and man["settings"]["steps"] == 3
    assert man["items"][1]["seeds"] == [image_seed(0, "1", 0), image_seed(0, "1", 1)]
    assert man["items"][1]["metadata"]["tag"] == man["items"][1]["metadata"]["tag"]  # GenEval record kept
    before = {f: _pixels(out / f) for f in files}
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    (out / "3_1.png").unlink()
    generate("shapes", tiny_model, out_dir=out, shard=(0, 1), batch_size=4, **KW)
    for f in files:
        if f != "3_1.png":
            assert (out / f).stat().st_mtime_ns == stamps[f], f"{f} was regenerated"
    assert np.abs(_pixels(out / "3_1.png") - before["3_1.png"]).max() <= 1
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
    # Distinct images really differ, so the equality above is not vacuous.
    assert np.abs(before["3_0.png"] - before["3_1.png"]).max() > 10


def test_shards_and_batch_sizes_give_the_same_images(tiny_model, tmp_path):
    full, sharded = tmp_path / "full", tmp_path / "sharded"
    generate("shapes", tiny_model, out_dir=full, shard=(0, 1), batch_size=5, **KW)
    for rank in range(2):
        generate("shapes", tiny_model, out_dir=sharded, shard=(rank, 2), batch_size=3, **KW)
        names = {p.name for p in sharded.glob("*.png")}
        if rank == 0:  # strided: rank 0 has items 0, 2, 4
            assert names == {f"{k}_{j}.png" for k in (0, 2, 4) for j in range(2)}
    assert load_manifest(sharded)["complete"]
    for p in full.glob("*.png"):
        assert np.abs(_pixels(p) - _pixels(sharded / p.name)).max() <= 1, p.name
    other = tmp_path / "seed1"
    generate("shapes", tiny_model, out_dir=other, shard=(0, 1), seed=1, batch_size=5, **{**KW, "limit": 1})
    assert np.abs(_pixels(other / "0_0.png") - _pixels(full / "0_0.png")).max() > 10


def test_other_settings_into_the_same_folder_are_refused(tiny_model, tmp_path):
    out = tmp_path / "run"
    generate("shapes", tiny_model, out_dir=out, shard=(0, 1), **{**KW, "limit": 1})
    with pytest.raises(EvalError, match=r"steps: 3 there, 4 now"):
        generate("shapes", tiny_model, out_dir=out, shard=(0, 1), **{**KW, "limit": 1, "steps": 4})
    with pytest.raises(EvalError, match="out of range"):
        generate("shapes", tiny_model, out_dir=tmp_path / "x", shard=(2, 2), **KW)


def test_unigenbench_csv_names_images_by_index(tiny_model, tmp_path):
    dims = json.dumps({"Testpoints": ["Attribute - Color"], "Testpoint Description": ["red"]}).replace('"', '""')
    csv = tmp_path / "mini.csv"
    csv.write_text("index,prompt_en,sub_dims_en\n" + "".join(
        f'{k},a photo of a red {c},"{dims}"\n' for k, c in [(7, "circle"), (12, "square")]))
    bench = load_benchmark("unigenbench", prompts=csv)
    assert bench.images_per_prompt == 4 and [it.key for it in bench.items] == ["7", "12"]
    out = tmp_path / "ugb"
    generate(bench, tiny_model, out_dir=out, shard=(0, 1), steps=2, device="cpu", progress=False)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{k}_{j}.png" for k in (7, 12) for j in range(4))
    assert load_manifest(out)["items"][0]["metadata"]["testpoints"] == ["Attribute - Color"]


def test_score_and_report_two_runs(tiny_model, tmp_path):
    base, trained = tmp_path / "base", tmp_path / "trained"
    generate("shapes", tiny_model, out_dir=base, shard=(0, 1), **{**KW, "steps": 2})
    generate("shapes", tiny_model, out_dir=trained, shard=(0, 1), **{**KW, "steps": 4})
    s1 = score(base, "auto", progress=False)
    assert s1["metric"] == "shapes" and s1["reward"] == "shapes_strict" and s1["n_images"] == 10
    tags = [it["metadata"]["tag"] for it in load_manifest(base)["items"]]
    assert set(s1["per_tag"]) == set(tags)
    assert s1["overall"] == pytest.approx(np.mean([v["mean"] for v in s1["per_tag"].values()]))
    assert score(base, "auto", progress=False)["scored_this_time"] == 0  # resumed from scores.jsonl
    score(trained, "shapes", progress=False)
    jpeg = score(trained, "jpeg_compressibility", progress=False)
    assert jpeg["n_images"] == 10 and jpeg["std"] >= 0
    out = tmp_path / "report"
    md_path = report([base, trained], out, n_prompts=3)
    md = md_path.read_text()
    assert "|  | base | trained | Δ (last − first) |" in md
    assert "## shapes" in md and "| Overall |" in md and "| colors |" in md and "same noise" in md
    assert "Not scored with jpeg_compressibility: base." in md
    chart = Image.open(out / "chart_shapes.png")
    assert chart.size[0] > 100
    grids = sorted((out / "grids").glob("*.png"))
    assert len(grids) == 3
    g = Image.open(grids[0])
    assert g.size == (2 * 2 * (192 + 4) + 4, 192 + 8)  # two runs x two images per prompt
    html = (out / "report.html").read_text()
    assert html.count('<img src="grids/') == 3 and "chart_shapes.png" in html


# ---- reward scoring on hand-made runs --------------------------------------------------------------
def _fake_run(run: Path, bench, images: list[np.ndarray]) -> None:
    from flowgrpo.eval.generate import GenerateSettings, write_manifest

    run.mkdir(parents=True)
    h, w = images[0].shape[:2]
    settings = GenerateSettings(bench.name, bench.source, "none", None, 1.0, 1, 1, 1.0, 0, h, w, "fp32")
    for it, img in zip(bench.items, images):
        Image.fromarray(img).save(run / f"{it.key}_0.png")
    write_manifest(run, settings, bench)


def _text_image(text: str) -> np.ndarray:
    from PIL import ImageDraw, ImageFont

    img = Image.new("RGB", (320, 128), "white")
    ImageDraw.Draw(img).text((12, 49), text, fill="black", font=ImageFont.load_default(size=30))
    return np.asarray(img)


def test_ocr_run_is_scored_with_the_ocr_reward(tmp_path):
    pytest.importorskip("rapidocr_onnxruntime")
    prompts = tmp_path / "ocr.txt"
    prompts.write_text('A shop sign that says "OPEN LATE"\nA poster reading "Hello World" in red\n')
    bench = load_benchmark("ocr", prompts=prompts)
    assert [it.metadata["ocr_text"] for it in bench.items] == ["OPEN LATE", "Hello World"]
    _fake_run(tmp_path / "run", bench, [_text_image("OPEN LATE"), _text_image("Goodbye")])
    s = score(tmp_path / "run", "auto", progress=False)
    assert s["metric"] == "ocr" and s["reward"] == "ocr"
    scores = [json.loads(ln)["score"] for ln in (tmp_path / "run/scores/ocr/scores.jsonl").read_text().splitlines()]
    assert scores[0] == 1.0 and scores[1] < 0.5
    assert s["overall"] == pytest.approx(np.mean(scores)) and s["extra_means"]["ocr_exact"] == 0.5
    bad = tmp_path / "bad.txt"
    bad.write_text("a sign with no quoted text\n")
    with pytest.raises(EvalError, match="no target text in double quotes"):
        load_benchmark("ocr", prompts=bad)


def test_geneval_run_scored_through_a_reward_server(tmp_path):
    """GenEval's path end to end: the `geneval` client reward against a real loopback reward
    server running the shapes world's GenEval scorer. Rendered scenes pass, blank ones fail."""
    from helpers.servers import serve_app

    from flowgrpo.rewards import make_reward
    from flowgrpo.rewards.server import create_app
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.render import render

    by_tag: dict[str, list[dict]] = {}
    for r in split_records()["test"]:
        by_tag.setdefault(r["tag"], []).append(r)
    recs = [by_tag["colors"][0], by_tag["colors"][1], by_tag["counting"][0], by_tag["position"][0]]
    path = tmp_path / "geneval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    bench = load_benchmark("geneval", prompts=path)
    blank = np.full((32, 32, 3), 255, np.uint8)
    _fake_run(tmp_path / "run", bench, [render(recs[0], 0), render(recs[1], 1), blank, render(recs[3], 3)])
    with serve_app(create_app(make_reward("geneval_shapes"))) as url:
        s = score(tmp_path / "run", "auto", reward_kwargs={"url": url}, progress=False)
    assert s["metric"] == "geneval" and s["value"] == "strict"
    assert s["per_tag"] == {"colors": {"mean": 1.0, "n": 2}, "counting": {"mean": 0.0, "n": 1},
                            "position": {"mean": 1.0, "n": 1}}
    assert s["overall"] == pytest.approx(2 / 3)  # mean of the tag means, not of the images (0.75)
    assert s["extra_means"]["partial"] < 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a dog", "tag": "colors"}\n')
    with pytest.raises(EvalError, match="needs an \"include\" list"):
        load_benchmark("geneval", prompts=bad)


def test_cli_generate_score_report_and_one_line_errors(tiny_model, tmp_path, capsys):
    from flowgrpo.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--benchmark", "shapes", "--model", tiny_model, "--images-per-prompt", "1", "--steps", "2",
              "--limit", "2", "--device", "cpu", "--quiet"]
    assert main(["eval", "generate", *common, "--out", str(a)]) == 0
    assert main(["eval", "generate", *common, "--out", str(b), "--seed", "3", "--shard", "0/1"]) == 0
    assert main(["eval", "score", str(a), "--quiet"]) == 0 and main(["eval", "score", str(b), "--quiet"]) == 0
    assert "| **Overall (mean of tags)** |" in capsys.readouterr().out
    assert main(["eval", "report", str(a), str(b), "--out", str(tmp_path / "rep"), "--names", "base,new"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "|  | base | new |" in md and "different seeds" in md
    capsys.readouterr()
    assert main(["eval", "generate", *common, "--out", str(a), "--steps", "5"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith("flowgrpo eval: error:") and "steps: 2 there, 5 now" in err[0]
    assert main(["eval", "score", str(tmp_path / "missing")]) == 2
    assert "not a generation run" in capsys.readouterr().err
    assert main(["eval", "score", str(a), "--metric", "unigenbench"]) == 2
    assert "needs a judge" in capsys.readouterr().err

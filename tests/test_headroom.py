"""`flowgrpo headroom`: pass@k against brute force, the aggregation on a hand-made array, and
the command end to end on tiny random models and on the shipped shapes model."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from flowgrpo.cli import main
from flowgrpo.eval.generate import image_seed
from flowgrpo.eval.headroom import aggregate, pass_at_k, pass_curve
from flowgrpo.rewards import make_reward

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "shapes-sd3"
SHAPES_PROMPTS = [
    {"prompt": "a photo of a red circle", "tag": "colors",
     "include": [{"class": "circle", "count": 1, "color": "red"}]},
    {"prompt": "a photo of a square", "tag": "single_object", "include": [{"class": "square", "count": 1}]},
    {"prompt": "a photo of a blue triangle", "tag": "colors",
     "include": [{"class": "triangle", "count": 1, "color": "blue"}]},
]


# ---- pass@k ---------------------------------------------------------------------------------
def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c of them correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_and_edge_cases():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 0, 1) == 0.0  # never solved
    assert pass_at_k(16, 16, 1) == 1.0 and pass_at_k(16, 1, 16) == 1.0  # c = n; k = n with one success
    assert pass_at_k(16, 3, 1) == pytest.approx(3 / 16)  # pass@1 is the pass rate
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)  # large n: the product form stays exact
    curve = pass_curve(16, 2)
    assert len(curve) == 16 and all(a <= b for a, b in zip(curve, curve[1:])) and curve[-1] == 1.0
    for bad in [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# ---- aggregation ----------------------------------------------------------------------------
def test_aggregation_on_a_hand_made_array():
    scores = np.array([[0, 0, 0, 0],            # a: never solved, flat
                       [1, 1, 1, 1],            # a: always solved, flat
                       [1, 0, 0, 0],            # b: c = 1
                       [.5, .5, .5, .5],        # b: never passes (0.5 < 1), flat although not 0
                       [1, 1, 0, .25]])         # b: c = 2
    passed = scores >= 1.0
    tags = ["a", "a", "b", "b", "b"]
    s = aggregate(scores, passed, tags, [f"p{i}" for i in range(5)])
    rows = s["per_prompt"]
    assert [r["passed"] for r in rows] == [0, 4, 1, 0, 2]
    assert [r["zero_signal"] for r in rows] == [1, 1, 0, 1, 0]
    assert [r["never"] for r in rows] == [1, 0, 0, 1, 0] and [r["always"] for r in rows] == [0, 1, 0, 0, 0]
    assert rows[2]["group_std"] == pytest.approx(np.std([1, 0, 0, 0]))
    assert rows[4]["pass_at_k"] == pytest.approx([0.5, 1 - 1 / 6, 1, 1])
    a, b = s["per_tag"]["a"], s["per_tag"]["b"]
    assert (a["prompts"], b["prompts"]) == (2, 3)
    assert a["pass@1"] == pytest.approx(0.5) and b["pass@1"] == pytest.approx((0.25 + 0 + 0.5) / 3)
    assert (a["never"], a["always"], a["zero_signal"]) == (0.5, 0.5, 1.0)
    assert b["never"] == pytest.approx(1 / 3) and b["always"] == 0 and b["zero_signal"] == pytest.approx(1 / 3)
    assert b["group_std"] == pytest.approx((np.std([1, 0, 0, 0]) + np.std([1, 1, 0, .25])) / 3)
    assert b["pass_at_k"][1] == pytest.approx((0.5 + 0 + 5 / 6) / 3)
    pr, tg = s["overall"]["prompts"], s["overall"]["tags"]
    assert pr["pass@1"] == pytest.approx((0 + 1 + .25 + 0 + .5) / 5)
    assert tg["pass@1"] == pytest.approx((a["pass@1"] + b["pass@1"]) / 2)
    assert pr["never"] == pytest.approx(2 / 5) and tg["never"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert pr["always"] == pytest.approx(1 / 5) and pr["zero_signal"] == pytest.approx(3 / 5)
    assert pr["zero_signal_groups"] == 3  # the trainer's group_advantages counts the same groups
    assert pr["group_std"] == pytest.approx(np.mean([np.std(r) for r in scores]))
    assert tg["pass_at_k"] == pytest.approx([(x + y) / 2 for x, y in zip(a["pass_at_k"], b["pass_at_k"])])
    untagged = aggregate(scores, passed)
    assert list(untagged["per_tag"]) == [""] and untagged["overall"]["tags"]["pass@1"] == pytest.approx(pr["pass@1"])


# ---- the command ----------------------------------------------------------------------------
def shapes_jsonl(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SHAPES_PROMPTS))
    return path


def direct_scores(model: Path, prompts: list[dict], reward: str, n: int, steps: int, guidance: float, size: int,
                  seed: int = 0) -> np.ndarray:
    """The same images made by the shapes evaluator's sampler from the documented seeds, scored
    by the reward directly: (P, n) scores."""
    from flowgrpo.eval.shapes import sample_images
    from flowgrpo.models import load_policy

    policy = load_policy(str(model))
    flat = [r for r in prompts for _ in range(n)]
    seeds = [image_seed(seed, str(i), j) for i in range(len(prompts)) for j in range(n)]
    images = sample_images(policy, [r["prompt"] for r in flat], seeds, steps=steps, guidance=guidance,
                           resolution=size, batch_size=5)
    out = make_reward(reward)(images, [r["prompt"] for r in flat], flat, np.repeat(np.arange(len(prompts)), n))
    return np.asarray(out.scores, dtype=np.float64).reshape(len(prompts), n)


def middle_value(scores: np.ndarray) -> float:
    """A threshold that some scores reach and some do not."""
    values = np.unique(scores)
    assert len(values) >= 2, scores
    return float(values[len(values) // 2])


def run_cli(*args) -> dict:
    out = Path(args[args.index("--out") + 1])
    assert main(["headroom", *map(str, args), "--quiet"]) == 0
    return json.loads((out / "headroom.json").read_text())


def test_command_on_the_tiny_shapes_model_matches_direct_scoring(tiny_shapes_model, tmp_path, capsys):
    prompts = shapes_jsonl(tmp_path)
    # shapes_dense: continuous, so a threshold among the direct scores splits the images
    ref = direct_scores(tiny_shapes_model, SHAPES_PROMPTS, "shapes_dense", n=4, steps=4, guidance=2.0, size=16)
    thr = middle_value(ref)
    res = run_cli("--model", tiny_shapes_model, "--prompts", prompts, "--reward", "shapes_dense", "--pass-on",
                  "score", "--threshold", thr, "--n", 4, "--steps", 4, "--batch-size", 5, "--out", tmp_path / "a")
    assert set(res) >= {"settings", "per_prompt", "per_tag", "overall", "n"}
    st = res["settings"]
    assert (st["n"], st["steps"], st["guidance"], st["resolution"], st["threshold"], st["pass_on"]) == \
        (4, 4, 2.0, 16, thr, "score")  # guidance and size from the folder's defaults
    rows = res["per_prompt"]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in SHAPES_PROMPTS]
    assert [r["tag"] for r in rows] == [r["tag"] for r in SHAPES_PROMPTS]
    np.testing.assert_allclose([r["scores"] for r in rows], ref, atol=1e-9)
    assert [r["passed"] for r in rows] == [int((x >= thr).sum()) for x in ref]
    assert sum(r["passed"] for r in rows) > 0 and sum(r["passed"] for r in rows) < ref.size
    for r in rows:
        assert len(r["pass_at_k"]) == 4 and r["pass_at_k"][0] == pytest.approx(r["passed"] / 4)
    assert set(res["per_tag"]) == {"colors", "single_object"} and res["per_tag"]["colors"]["prompts"] == 2
    for key in ("pass@1", "pass_at_k", "never", "always", "group_std", "zero_signal"):
        assert key in res["overall"]["prompts"] and key in res["overall"]["tags"]
    assert (tmp_path / "a" / "headroom.png").stat().st_size > 1000
    assert "mean of tags" in capsys.readouterr().out

    # default pass-on for a shapes reward: its strict component, default threshold 1.0
    res = run_cli("--model", tiny_shapes_model, "--prompts", prompts, "--reward", "shapes_partial", "--n", 4,
                  "--steps", 4, "--tags", "colors", "--out", tmp_path / "b")
    assert res["settings"]["pass_on"] == "strict" and res["settings"]["threshold"] == 1.0
    assert [r["index"] for r in res["per_prompt"]] == [0, 2]  # positions in the file: the seeds' keys
    strict = direct_scores(tiny_shapes_model, SHAPES_PROMPTS, "shapes_strict", n=4, steps=4, guidance=2.0, size=16)
    assert [r["passed"] for r in res["per_prompt"]] == [int(strict[0].sum()), int(strict[2].sum())]


def test_results_do_not_depend_on_the_batch_size(tiny_shapes_model, tmp_path):
    prompts = shapes_jsonl(tmp_path)
    common = ["--model", tiny_shapes_model, "--prompts", prompts, "--reward", "shapes_dense", "--pass-on", "score",
              "--threshold", 0.05, "--n", 4, "--steps", 3, "--seed", 7]
    small = run_cli(*common, "--batch-size", 2, "--out", tmp_path / "b2")
    big = run_cli(*common, "--batch-size", 64, "--out", tmp_path / "b64")
    assert [r["passed"] for r in small["per_prompt"]] == [r["passed"] for r in big["per_prompt"]]
    assert 0 < sum(r["passed"] for r in small["per_prompt"]) < 12  # a split, not all or nothing
    np.testing.assert_allclose([r["scores"] for r in small["per_prompt"]], [r["scores"] for r in big["per_prompt"]],
                               atol=1e-9)
    assert small["overall"] == big["overall"]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    from helpers.pipelines import build_sd3

    return build_sd3(tmp_path_factory.mktemp("headroom_sd3") / "sd3")


def test_command_on_a_tiny_real_sd3_pipeline_with_a_threshold(tiny_sd3, tmp_path, capsys):
    from flowgrpo.eval.headroom import sample_batches, seeds_for
    from flowgrpo.models import load_policy

    prompts = tmp_path / "prompts.txt"
    texts = ["a red circle", "two blue squares", 'a sign that says "hi"']
    prompts.write_text("\n".join(texts) + "\n")
    # the reward on the driver's own images, scored directly
    policy = load_policy(str(tiny_sd3))
    flat = [p for p in texts for _ in range(3)]
    imgs = np.concatenate([im for _, im in sample_batches(policy, flat, seeds_for(0, [0, 1, 2], 3), steps=3,
                                                          guidance=3.0, resolution=16, batch_size=4)])
    ref = make_reward("jpeg_compressibility")(imgs, flat).scores.reshape(3, 3)
    thr = middle_value(ref)
    res = run_cli("--model", tiny_sd3, "--prompts", prompts, "--reward", "jpeg_compressibility", "--threshold", thr,
                  "--n", 3, "--steps", 3, "--out", tmp_path / "o")
    assert res["settings"]["guidance"] == 3.0 and res["settings"]["pass_on"] == "score"  # true CFG, folder default
    assert list(res["per_tag"]) == [""]
    np.testing.assert_allclose([r["scores"] for r in res["per_prompt"]], ref, atol=1e-9)
    assert [r["passed"] for r in res["per_prompt"]] == [int((x >= thr).sum()) for x in ref]
    capsys.readouterr()
    # a continuous reward without --threshold: refused with one line, not a meaningless table
    assert main(["headroom", "--model", str(tiny_sd3), "--prompts", str(prompts), "--reward", "jpeg_compressibility",
                 "--n", "2", "--steps", "2", "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and "--threshold" in err[0] and "not 0/1" in err[0]


def test_the_shipped_shapes_model_runs(tmp_path, capsys):
    res = run_cli("--model", SHIPPED, "--prompts", "shapes:test", "--limit", 2, "--reward", "shapes_strict", "--n", 2,
                  "--steps", 10, "--guidance", 1.0, "--out", tmp_path)
    assert res["settings"]["resolution"] == 32 and len(res["per_prompt"]) == 2
    assert all(r["n"] == 2 and 0 <= r["passed"] <= 2 for r in res["per_prompt"])
    assert "pass@2" in capsys.readouterr().out


def test_bad_input_is_one_line(tiny_shapes_model, tmp_path, capsys):
    prompts = shapes_jsonl(tmp_path)
    base = ["headroom", "--model", str(tiny_shapes_model), "--prompts", str(prompts), "--steps", "2", "--n", "2",
            "--quiet"]
    cases = [
        (["--reward", "nope"], "unknown reward 'nope'"),
        (["--reward", "shapes_strict", "--n", "0"], "--n must be at least 1"),
        (["--reward", "shapes_strict", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--reward", "shapes_strict", "--model", str(tmp_path / "missing")], "does not exist"),
        (["--reward", "shapes_strict", "--prompts", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--reward", "shapes_strict", "--tags", "nosuchtag"], "have tags"),
        (["--reward", "shapes_strict", "--pass-on", "nosuch"], "has no component 'nosuch'"),
        (["--reward", "shapes_dense", "--pass-on", "score"], "pass --threshold"),
        (["--reward", "shapes_strict", "--lora", str(tmp_path / "nolora")], "LoRA folder"),
        (["--reward", "shapes_strict", "--reward-arg", "oops"], "KEY=VALUE"),
    ]
    for extra, msg in cases:
        assert main(base + extra) == 2, extra
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
        assert len(err) == 1 and msg in err[0], (extra, err)

import json

import numpy as np
import pytest

from flowgrpo.worlds.shapes.grammar import (HELD_OUT_BINDINGS, TAGS, GrammarError, all_records, bindings,
                                            parse_prompt, split_records, validate_record)
from flowgrpo.worlds.shapes.render import render, render_layout, sample_layout
from flowgrpo.worlds.shapes.verify import Detection, detect, relative_position, score

GENEVAL_PHRASES = {
    "a photo of a circle": "single_object",
    "a photo of a red circle": "colors",
    "a photo of three green triangles": None,  # counting prompts are uncoloured in GenEval
    "a photo of three triangles": "counting",
    "a photo of a circle and a square": "two_object",
    "a photo of a red circle and a blue square": "color_attr",
    "a photo of a square left of a circle": "position",
}


def test_geneval_phrasing_and_schema():
    for prompt, tag in GENEVAL_PHRASES.items():
        if tag is None:
            with pytest.raises(GrammarError):
                parse_prompt(prompt)
            continue
        rec = parse_prompt(prompt)
        assert rec["tag"] == tag and rec["prompt"] == prompt
    pos = parse_prompt("a photo of a square left of a circle")
    # GenEval: the reference object first, the positioned one points at it by index
    assert pos["include"] == [{"class": "circle", "count": 1},
                              {"class": "square", "count": 1, "position": ["left of", 0]}]
    cnt = parse_prompt("a photo of four squares")
    assert cnt["include"] == [{"class": "square", "count": 4}] and cnt["exclude"] == [{"class": "square", "count": 5}]


def test_every_record_round_trips_and_all_tags_present():
    recs = all_records()
    assert {r["tag"] for r in recs} == set(TAGS)
    for r in recs:
        assert parse_prompt(r["prompt"]) == r
        json.dumps(r)


def test_split_is_deterministic_and_holds_out_bindings():
    a, b = split_records(), split_records()
    assert a == b
    train_prompts = {r["prompt"] for r in a["train"]}
    test_prompts = {r["prompt"] for r in a["test"]}
    assert {r["tag"] for r in a["test"]} == set(TAGS)
    # no training prompt binds a held-out colour to its object
    assert not any(bindings(r) & set(HELD_OUT_BINDINGS) for r in a["train"])
    assert any(bindings(r) & set(HELD_OUT_BINDINGS) for r in a["test"])
    # only single_object (3 prompts) is shared between the splits
    assert {parse_prompt(p)["tag"] for p in train_prompts & test_prompts} == {"single_object"}


def test_outside_grammar_errors_name_the_problem():
    for bad in ["a photo of a dog", "an image of a circle", "a photo of five circles", "a photo of a purple square"]:
        with pytest.raises(GrammarError, match="outside the shapes grammar|not in|counting"):
            parse_prompt(bad)
    with pytest.raises(GrammarError, match="class 'dog'"):
        validate_record({"include": [{"class": "dog", "count": 1}]})


def test_verifier_accepts_renderer_output():
    rng = np.random.default_rng(0)
    recs = all_records() * 8
    failed = [r["prompt"] for r in recs if not score(render(r, rng), r).strict]
    assert not failed, failed  # every render verifies (docs/shapes-world.md)


@pytest.mark.parametrize("gap,cells", [(4, False), (2, True), (4, True)])
def test_wider_gaps_and_cell_layouts_keep_objects_apart_and_verifiable(gap, cells):
    rng = np.random.default_rng(1)
    for r in all_records() * 2:
        objects = sample_layout(r, rng, gap=gap, cells=cells)
        boxes = [b for _, _, b in objects]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                apart = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert apart >= gap, (r["prompt"], a, b)
        if cells and len(boxes) > 1:
            quarters = {(int(b[0] >= 16), int(b[1] >= 16)) for b in boxes}
            assert len(quarters) == len(boxes) and all((b[2] <= 16) == (b[0] < 16) for b in boxes)
        assert score(render_layout(objects), r).strict


def test_centred_relations_put_the_pair_where_the_relation_says():
    rng = np.random.default_rng(2)
    position = [r for r in all_records() if r["tag"] == "position"]
    for r in position * 20:
        (ref_cls, _, ref), (obj_cls, _, obj) = sample_layout(r, rng, gap=4, cells=True, centred_relations=True)
        assert (ref_cls, obj_cls) == (r["include"][0]["class"], r["include"][1]["class"])
        rel = r["include"][1]["position"][0]
        along, across = (0, 1) if rel in ("left of", "right of") else (1, 0)
        obj_first = rel in ("left of", "above")
        # each object in its own half along the relation's axis, both centred across it to within a pixel
        assert (obj[along + 2] <= 16 <= ref[along]) if obj_first else (ref[along + 2] <= 16 <= obj[along])
        for box in (ref, obj):
            assert abs((box[across] + box[across + 2]) - 32) <= 3, (r["prompt"], box)
        assert relative_position(obj, ref) == {rel}
        assert score(render_layout([(ref_cls, "red", ref), (obj_cls, "blue", obj)]), r).strict
    # other tags keep the layout `cells` gives them, draw for draw
    other = [r for r in all_records() if r["tag"] != "position"]
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert all(sample_layout(r, a, cells=True) == sample_layout(r, b, cells=True, centred_relations=True) for r in other)

def _truth(objects, record) -> float:
    """Score a record against the renderer's own objects (ground truth, no detection)."""
    dets = [Detection(c, col, box, (box[2] - box[0]) ** 2, 1.0) for c, col, box in objects]
    return score(np.zeros((32, 32, 3), np.uint8), record, detections=dets).strict


def test_verifier_rejects_mismatched_metadata():
    rng = np.random.default_rng(1)
    recs = all_records()
    false_accept, wrong_pairs, raw_accept, pairs = 0, 0, 0, 0
    for i in range(1500):
        src = recs[i % len(recs)]
        other = recs[int(rng.integers(len(recs)))]
        if other["prompt"] == src["prompt"]:
            continue
        objs = sample_layout(src, rng)
        img = render_layout(objs)
        accepted = score(img, other).strict
        pairs += 1
        raw_accept += accepted
        if not _truth(objs, other):  # the scene really does not satisfy the other prompt
            wrong_pairs += 1
            false_accept += accepted
    # GenEval semantics make some mismatched pairs true (an image of "a red circle"
    # satisfies "a photo of a circle"); the verifier must reject the ones that are false.
    assert false_accept / wrong_pairs <= 0.02
    assert raw_accept / pairs < 0.15


def test_relations_follow_geneval():
    assert relative_position((0, 10, 8, 18), (20, 10, 28, 18)) == {"left of"}
    assert relative_position((10, 0, 18, 8), (10, 20, 18, 28)) == {"above"}
    assert relative_position((10, 10, 18, 18), (11, 10, 19, 18)) == set()


def test_detection_finds_classes_and_colours():
    rec = parse_prompt("a photo of a red circle and a blue square")
    img = render(rec, 3)
    found = {(d.cls, d.color) for d in detect(img)}
    assert found == {("circle", "red"), ("square", "blue")}
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert detect(blank) == []
    assert score(blank, rec).strict == 0.0 and score(blank, rec).partial == 0.0


def test_partial_credit_counts_clauses():
    rec = parse_prompt("a photo of a red circle and a blue square")
    only_circle = render(parse_prompt("a photo of a red circle"), 5)
    v = score(only_circle, rec)
    assert v.strict == 0.0 and 0.0 < v.partial < 1.0


def test_image_statistics_tell_renders_from_blurred_dimmed_and_enlarged_scenes():
    """size, saturation and edge sharpness: the statistics the studies compare samples with
    renders by (a biased scorer's bonus, an adversarial reward's pull)."""
    from scipy.ndimage import uniform_filter, zoom

    from flowgrpo.eval.shapes import image_stats_vs_renders
    from flowgrpo.rewards.shapes import image_statistics
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.render import render_batch

    recs = split_records()["test"][:24]
    imgs = render_batch(recs, seed=5)
    base = {k: v.mean() for k, v in image_statistics(imgs).items()}
    blurred = np.stack([uniform_filter(i.astype(float), size=(3, 3, 1)) for i in imgs]).round().astype(np.uint8)
    assert image_statistics(blurred)["sharpness"].mean() < 0.8 * base["sharpness"]
    grey = imgs.astype(float).mean(-1, keepdims=True)
    washed = (grey + 0.5 * (imgs - grey)).round().astype(np.uint8)  # half the chroma
    assert image_statistics(washed)["saturation"].mean() < base["saturation"] - 0.1
    big = np.stack([zoom(i, (2, 2, 1), order=0)[16:48, 16:48] for i in imgs])  # the centre, twice as large
    assert image_statistics(big)["size"].mean() > base["size"]
    table = image_stats_vs_renders(imgs, recs, seed=5)  # the same scenes: equal to their own renders
    assert set(table) == {"size", "saturation", "sharpness", "size_ref", "saturation_ref", "sharpness_ref"}
    assert table["size"] == pytest.approx(table["size_ref"]) and table["sharpness"] == pytest.approx(table["sharpness_ref"])


def test_drawing_quality_rewards_clean_shapes_and_not_choices():
    """shapes_quality: 1 for any clean scene with enough objects, right or wrong; a merged blob,
    a blank or a scene short of objects scores below 1."""
    from flowgrpo.rewards import make_reward

    reward = make_reward("shapes_quality")
    three = parse_prompt("a photo of three squares")
    wrong_but_clean = render(parse_prompt("a photo of three circles"), 1)  # the wrong class, drawn cleanly
    right = render(three, 1)
    one = render(parse_prompt("a photo of a square"), 1)  # clean, but two objects short
    blank = np.full((32, 32, 3), 255, np.uint8)
    blob = blank.copy()
    blob[8:14, 2:30] = (220, 30, 30)  # a 28 x 6 bar: no class
    out = reward([right, wrong_but_clean, one, blank, blob], [three["prompt"]] * 5)
    assert out.scores.tolist() == pytest.approx([1.0, 1.0, 1 / 3, 0.0, 0.0])
    assert out.components["strict"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_named_objects_script_bins_unnamed_detections():
    """scripts/named_objects.py: merged objects show as far-from-square boxes, the rest by IoU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "named_objects.py"
    spec = importlib.util.spec_from_file_location("named_objects", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    img = np.full((32, 32, 3), 255, np.uint8)
    img[4:10, 2:30] = (220, 30, 30)  # a bar: two squares merged side by side
    img[16:28, 4:16] = (30, 30, 220)  # a clean square
    dets = detect(img)
    assert sorted(d.cls for d in dets) == ["square", "unknown"]
    assert [mod.unnamed_reason(d) for d in dets if d.cls == "unknown"] == ["aspect"]
    ring = np.full((32, 32, 3), 255, np.uint8)
    ring[8:20, 8:20] = (30, 160, 30)
    ring[9:19, 9:19] = 255  # a thin square outline: square box, no shape fits
    (det,) = detect(ring)
    assert det.cls == "unknown" and mod.unnamed_reason(det) == "no shape (IoU < 0.5)"

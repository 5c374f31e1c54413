"""The learned proxy of the shapes verifier: trains, saves, loads, scores as a pointwise reward
and as a pairwise judge, and agrees with the verifier better than chance."""

import json

import numpy as np
import pytest

from flowgrpo.cli import main
from flowgrpo.rewards import make_reward
from flowgrpo.rewards.base import RewardError
from flowgrpo.worlds.shapes.grammar import all_records
from flowgrpo.worlds.shapes.proxy import (ProxyArchitecture, agreement, labelled_images, load_proxy, make_proxy,
                                          predict, prompt_features)
from flowgrpo.worlds.shapes.render import render


def test_prompt_features_tell_apart_every_two_prompts_that_ask_for_different_things():
    def meaning(r):  # "a red circle and a blue square" asks what "a blue square and a red circle" asks
        if any("position" in c for c in r["include"]):
            return r["prompt"]
        return r["tag"], tuple(sorted(json.dumps(c, sort_keys=True) for c in r["include"] + r.get("exclude", [])))

    by_features = {}
    for r in all_records():
        by_features.setdefault(prompt_features(r).tobytes(), set()).add(meaning(r))
    assert all(len(m) == 1 for m in by_features.values())
    assert len(by_features) == len({meaning(r) for r in all_records()})


def test_make_proxy_trains_saves_and_serves(tmp_path):
    info = make_proxy(tmp_path / "proxy", renders=200, samples=0, prompts_per_image=4, epochs=8,
                      arch=ProxyArchitecture(width=8, hidden=32), seed=0)
    meta = json.loads((tmp_path / "proxy" / "proxy.json").read_text())
    assert meta["held_out"] == info["held_out"] and meta["architecture"] == {"width": 8, "hidden": 32}
    # tiny and 8 epochs: 0.19 at seed 0 (about 2 standard errors over the held-out pairs); the
    # default make-proxy reaches far more, see docs
    assert info["held_out"]["spearman"] > 0.1
    net, _ = load_proxy(tmp_path / "proxy")
    records = all_records()[:6]
    images = np.stack([render(r, i) for i, r in enumerate(records)])
    reward = make_reward("shapes_proxy", path=str(tmp_path / "proxy"))
    out = reward(images, [r["prompt"] for r in records])  # records parsed from the prompts
    assert out.scores.shape == (6,) and np.all((out.scores >= 0) & (out.scores <= 1))
    np.testing.assert_allclose(out.scores, predict(net, images, records), rtol=1e-6)
    judge = make_reward("pref_winrate", judge="shapes_proxy", judge_args={"path": str(tmp_path / "proxy")})
    wins = judge(images[:4], [records[0]["prompt"]] * 4, None, np.zeros(4, int)).scores
    own = reward(images[:4], [records[0]["prompt"]] * 4).scores
    assert wins.mean() == pytest.approx(0.5) and np.argmax(wins) == np.argmax(own)


def test_agreement_counts_pairs_of_one_prompt():
    recs = [{"prompt": "a"}] * 3 + [{"prompt": "b"}] * 2
    labels = np.array([0.0, 0.5, 1.0, 0.0, 1.0])
    a = agreement(np.array([0.1, 0.4, 0.9, 0.8, 0.2]), labels, recs)
    assert a["pairs"] == 4 and a["pair_accuracy"] == 0.75


def test_labels_are_the_verifiers(tmp_path):
    from flowgrpo.worlds.shapes.verify import score

    images, index, records, labels, source = labelled_images(5, 0, 3, None, seed=3)
    assert len(images) == 5 and list(source) == [0] * 5 and list(index) == [i for i in range(5) for _ in range(3)]
    assert all(score(images[i], r).partial == lab for i, r, lab in zip(index, records, labels))
    assert labels[::3].min() == 1.0  # a render satisfies the prompt it was made for
    assert labels.min() < 1.0  # and other prompts only partly


def test_missing_or_bad_proxy_is_named(tmp_path, capsys):
    with pytest.raises(RewardError, match="make-proxy"):
        make_reward("shapes_proxy")
    with pytest.raises(RewardError, match="make-proxy --out"):
        make_reward("shapes_proxy", path=str(tmp_path))
    assert main(["make-proxy", "--out", str(tmp_path), "--model", str(tmp_path)]) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err

"""Score a generated run: UniGenBench (MLLM judge), GenEval, OCR, shapes, or any pointwise reward.

Metrics and what they report (means over images; `overall` is the headline number):
- unigenbench: see eval/unigenbench.py (percent; pooled primaries, their unweighted mean).
- geneval:     the `geneval` client reward talking to a GenEval scorer behind
               `flowgrpo serve-reward` (`--reward-url http://HOST:PORT`; default
               127.0.0.1:18085), or any reward named with --reward. Per image the strict 0/1
               correctness (component "strict" when the reward has it, else its score); per
               tag the mean; overall = mean of the tag means (GenEval's convention).
- shapes:      the shapes verifier (`shapes_strict`): the same table as GenEval.
- ocr:         the OCR reward: mean of 1 - d / len(target); also the exact-match rate.
- any other registered pointwise reward (or remote:URL): mean and std of its score, and
               per-tag means when the prompts carry GenEval tags.

Per-image results are cached in `<out>/scores.jsonl` (keyed by file and PNG hash), so a
restarted scoring run only scores what is new. Outputs: summary.json, scores.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .benchmarks import EvalError
from .generate import load_manifest

# metric -> (default reward name, component holding the per-image accuracy or None for the score)
PRESETS = {"geneval": ("geneval", "strict"), "shapes": ("shapes_strict", "strict"), "ocr": ("ocr", None)}
AUTO = {"unigenbench": "unigenbench", "geneval": "geneval", "ocr": "ocr", "shapes": "shapes"}


def resolve_metric(run_dir: Path, metric: str) -> str:
    if metric != "auto":
        return metric
    bench = load_manifest(run_dir)["settings"]["benchmark"]
    if bench not in AUTO:
        raise EvalError(f"{run_dir} was generated from a plain prompt file: name what to score with --metric "
                        f"(a reward name such as jpeg_compressibility, or remote:URL)")
    return AUTO[bench]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")[:80] or "metric"


def score(run_dir: str | Path, metric: str = "auto", *, reward: str | None = None, out_dir: str | Path | None = None,
          judge=None, batch_size: int = 16, parse_retries: int = 2, retry_failures: bool = False,
          image_format: str = "PNG", reward_kwargs: dict | None = None, progress: bool = True,
          judge_options: dict | None = None) -> dict:
    """Score `run_dir` with `metric` (see module docstring); returns the summary dict.

    `judge` is a chat.ChatConfig for UniGenBench and `judge_options` further keyword
    arguments of unigenbench.score_run; `reward` overrides the preset reward name.
    """
    run_dir = Path(run_dir)
    metric = resolve_metric(run_dir, metric)
    if metric == "unigenbench":
        if judge is None:
            raise EvalError("UniGenBench scoring needs a judge: --judge-url http://HOST:PORT/v1 --judge-model NAME")
        from .unigenbench import score_run

        return score_run(run_dir, judge, out_dir, parse_retries=parse_retries, retry_failures=retry_failures,
                         image_format=image_format, progress=progress, **(judge_options or {}))
    reward_name, component = PRESETS.get(metric, (metric, None))
    reward_name = reward or reward_name
    out = Path(out_dir) if out_dir else run_dir / "scores" / _slug(metric if metric in PRESETS else reward_name)
    return score_with_reward(run_dir, reward_name, out, metric=metric, component=component, batch_size=batch_size,
                             reward_kwargs=reward_kwargs, progress=progress)


def _make(reward_name: str, metric: str, kwargs: dict | None):
    from ..rewards.base import RewardError, make_reward

    try:
        rew = make_reward(reward_name, **(kwargs or {}))
    except RewardError as exc:
        if metric == "geneval":
            raise EvalError(f"GenEval scoring needs a GenEval scorer behind `flowgrpo serve-reward` (see "
                            f"docs/evaluation.md); give its address with --reward-url http://HOST:PORT "
                            f"({exc})") from None
        raise
    if getattr(rew, "needs_groups", False) or getattr(rew, "kind", "pointwise") == "pairwise":
        raise EvalError(f"reward {reward_name!r} compares images within a group; benchmark scores need a "
                        f"pointwise reward")
    return rew


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _load_cache(path: Path) -> dict[str, dict]:
    cache = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run: that image is scored again
            cache[rec["image"]] = rec
    return cache


def score_with_reward(run_dir: Path, reward_name: str, out: Path, *, metric: str, component: str | None,
                      batch_size: int = 16, reward_kwargs: dict | None = None, progress: bool = True) -> dict:
    manifest = load_manifest(run_dir)
    jobs, missing = [], []
    for it in manifest["items"]:
        for f in it["files"]:
            (jobs if (run_dir / f).is_file() else missing).append((it, f))
    if missing:
        raise EvalError(f"{run_dir}: {len(missing)} image(s) not generated yet (e.g. {missing[0][1]}); finish "
                        f"`flowgrpo eval generate` first (it resumes)")
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "scores.jsonl"
    cache = _load_cache(cache_path)
    shas = {f: _sha(run_dir / f) for _, f in jobs}
    todo = [(it, f) for it, f in jobs
            if cache.get(f, {}).get("sha") != shas[f] or cache[f].get("reward") != reward_name]
    info_totals: dict[str, float] = {}
    if todo:
        rew = _make(reward_name, metric, reward_kwargs)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"scoring {metric}", unit="img")
        with cache_path.open("a", encoding="utf-8") as fh:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                images = np.stack([np.asarray(Image.open(run_dir / f).convert("RGB")) for _, f in chunk])
                res = rew(images, [it["prompt"] for it, _ in chunk], [it.get("metadata") or {} for it, _ in chunk])
                for k, v in res.info.items():
                    info_totals[k] = info_totals.get(k, 0.0) + float(v)
                for n, (it, f) in enumerate(chunk):
                    comps = {k: _num(v[n]) for k, v in res.components.items()}
                    rec = {"image": f, "key": it["key"], "reward": reward_name, "sha": shas[f],
                           "score": _num(res.scores[n]), "components": comps}
                    cache[f] = rec
                    fh.write(json.dumps(rec) + "\n")
                fh.flush()
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
    records = [(it, cache[f]) for it, f in jobs]
    summary = summarize(records, metric, reward_name, component)
    summary.update({"run": str(run_dir), "scored_this_time": len(todo), "reward_info": info_totals})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "scores.md").write_text(markdown_summary(summary))
    return summary


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def summarize(records: list[tuple[dict, dict]], metric: str, reward_name: str, component: str | None) -> dict:
    """Per-image value = the component (when given and present) else the score; per-tag means;
    overall = mean of tag means when tags exist (GenEval), else the plain mean."""
    values, tags, unscored = [], [], 0
    for it, rec in records:
        v = rec["components"].get(component) if component else None
        v = rec["score"] if v is None else v
        if v is None:
            unscored += 1
            continue
        values.append(v)
        tags.append((it.get("metadata") or {}).get("tag"))
    if not values:
        raise EvalError(f"reward {reward_name!r} gave no usable score for any image")
    arr = np.asarray(values, dtype=np.float64)
    per_tag: dict[str, dict] = {}
    if all(t is not None for t in tags):
        for t in dict.fromkeys(tags):
            sel = arr[[i for i, x in enumerate(tags) if x == t]]
            per_tag[t] = {"mean": float(sel.mean()), "n": int(sel.size)}
    overall = float(np.mean([v["mean"] for v in per_tag.values()])) if per_tag else float(arr.mean())
    summary = {"metric": metric, "reward": reward_name, "value": component or "score", "overall": overall,
               "mean": float(arr.mean()), "std": float(arr.std()), "n_images": len(records),
               "unscored_images": unscored, "per_tag": per_tag}
    extra = {}
    for name in ("partial", "ocr_exact"):
        vals = [rec["components"].get(name) for _, rec in records if rec["components"].get(name) is not None]
        if vals:
            extra[name] = float(np.mean(vals))
    summary["extra_means"] = extra
    return summary


def markdown_summary(s: dict) -> str:
    lines = [f"# {s['metric']}: overall {s['overall']:.4f}", "",
             f"Reward `{s['reward']}` ({s['value']}); {s['n_images']} images, mean {s['mean']:.4f} "
             f"(std {s['std']:.4f}); {s['unscored_images']} unscored."]
    if s.get("reward_info"):
        counters = ", ".join(f"{k} {v:g}" for k, v in s["reward_info"].items())
        lines.append(f"Reward counters (images scored in this pass): {counters}.")
    for k, v in s.get("extra_means", {}).items():
        lines.append(f"Mean {k}: {v:.4f}.")
    if s["per_tag"]:
        lines += ["", "| Tag | Mean | Images |", "|---|---:|---:|"]
        lines += [f"| {t} | {v['mean']:.4f} | {v['n']} |" for t, v in s["per_tag"].items()]
        lines.append(f"| **Overall (mean of tags)** | **{s['overall']:.4f}** | {s['n_images']} |")
    return "\n".join(lines) + "\n"

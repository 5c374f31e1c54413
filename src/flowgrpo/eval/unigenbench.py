"""UniGenBench scoring with an MLLM judge behind any OpenAI-compatible server.

Per image the judge gets the image, its prompt and the prompt's testpoints (name, what the
sub-dimension checks, and what it means in this prompt), and must answer

    <analysis>[one short note per testpoint]</analysis>
    <score>[s_1, ..., s_n]</score>        each s_i is the integer 0 or 1

(the score tag is the format the UniGenBench eval models were trained to emit). That is the
project's own question; `template_file` asks the official one instead, from the user's copy,
and `parser="official"` reads answers as the official scorer does (first <analysis> and
<score> blocks); see unigenbench_protocol.py. Parsing is strict by default: the last <score>
block after any <think> block must be a JSON list of exactly n integers in {0, 1}.

Retries (`retry_style`):
- `correct` (default): a bad answer is re-asked with the reason appended to the conversation,
  up to `parse_retries` times; a request that fails after the chat client's transport
  retries ends the image's questioning.
- `fresh` (the official scorer's way, with `parse_retries=10`: up to 11 attempts): the same
  single-turn question is sent again, up to `parse_retries` more times, after an unreadable
  answer or a failed request alike.
Then the image is recorded as a failure. Failures are counted and printed in every output,
never dropped silently.

`testpoints` (a CSV path) scores the run against another version of the benchmark's
testpoints, e.g. the Aug-2025 file behind the published numbers (docs/evaluation.md).

Scores (percent), with n_d the judged testpoints of sub-dimension d and k_d those scored 1:
    sub-dimension d:  100 * k_d / n_d
    primary P:        100 * sum_{d in P} k_d / sum_{d in P} n_d       (pooled, not averaged)
    overall:          mean over the 10 primaries (unweighted)
Failed images contribute nothing (as in the reference); `overall_failures_as_zero` also
reports the overall with every failed testpoint counted as 0, to bound their effect.

Every verdict is appended to `verdicts.jsonl` as it arrives, keyed by image file, judge
model and the PNG's hash, with its testpoints and protocol (template and parser): a
restarted run asks only about images without a verdict under the same protocol.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..chat import ChatClient, ChatConfig, image_part, text_part
from .benchmarks import PRIMARY_DIMENSIONS, SUBDIMENSIONS, EvalError, primary_of
from .generate import load_manifest
from .unigenbench_protocol import (PARSE, PARSERS, ScorerPrompt, VerdictError, judge_instruction,  # noqa: F401
                                   parse_scores, parse_scores_official, testpoint_overrides)

VERDICTS = "verdicts.jsonl"
RETRY_STYLES = ("correct", "fresh")


@dataclass
class JudgeRequest:
    image_file: str  # name inside the run folder, e.g. "12_3.png"
    image_path: Path
    prompt: str
    testpoints: list[str]
    descriptions: list[str]
    sha: str = ""


@dataclass
class Verdict:
    image: str
    key: str
    testpoints: list[str]
    scores: list[int] | None  # None after a failure
    error: str | None = None
    attempts: int = 0
    judge: str = ""
    sha: str = ""
    answer: str | None = None  # the last raw answer, for auditing
    asks: int = 0  # questions asked: turns of the conversation, or fresh attempts
    protocol: str = "project/strict"  # the question's template and the parser

    def to_json(self) -> dict:
        return {"image": self.image, "key": self.key, "testpoints": self.testpoints, "scores": self.scores,
                "error": self.error, "attempts": self.attempts, "asks": self.asks, "judge": self.judge,
                "sha": self.sha, "protocol": self.protocol, "answer": self.answer}


class UniGenBenchJudge:
    """Asks the judge about many images at once and returns one Verdict per request."""

    def __init__(self, config: ChatConfig, parse_retries: int = 2, image_format: str = "PNG",
                 image_quality: int = 95, parser: str = "strict", retry_style: str = "correct",
                 prompt: ScorerPrompt | None = None):
        if parser not in PARSERS:
            raise EvalError(f"UniGenBench parser must be one of {list(PARSERS)}, got {parser!r}")
        if retry_style not in RETRY_STYLES:
            raise EvalError(f"UniGenBench retry style must be one of {list(RETRY_STYLES)}, got {retry_style!r}")
        if parse_retries < 0:
            raise EvalError(f"parse retries must be >= 0, got {parse_retries}")
        if image_format.upper() not in ("PNG", "JPEG"):
            raise EvalError(f"image format must be PNG or JPEG, got {image_format!r}")
        if not 1 <= int(image_quality) <= 100:
            raise EvalError(f"image quality must be in 1..100, got {image_quality!r}")
        self.config = config
        self.client = ChatClient(config)
        self.parse_retries = parse_retries
        self.image_format = image_format.upper()
        self.image_quality = int(image_quality) if self.image_format == "JPEG" else None
        self.parser, self.parse = parser, PARSE[parser]
        self.retry_style = retry_style
        self.prompt = prompt or ScorerPrompt()
        self.protocol = f"{self.prompt.protocol}/{parser}"

    def _first_message(self, req: JudgeRequest) -> dict:
        with Image.open(req.image_path) as im:
            part = image_part(im.convert("RGB"), self.image_format, self.image_quality)
        return {"role": "user", "content": [part, text_part(
            self.prompt.text(req.prompt, req.testpoints, req.descriptions))]}

    def _base(self, req: JudgeRequest) -> dict:
        return dict(image=req.image_file, key=req.image_file.rsplit("_", 1)[0], testpoints=req.testpoints,
                    judge=self.config.model, sha=req.sha, protocol=self.protocol)

    def judge(self, requests: list[JudgeRequest]) -> list[Verdict]:
        if self.retry_style == "fresh":
            return self._judge_fresh(requests)
        convs = {i: [self._first_message(r)] for i, r in enumerate(requests)}
        out: dict[int, Verdict] = {}
        attempts = {i: 0 for i in convs}
        for round_ in range(self.parse_retries + 1):
            if not convs:
                break
            ids = list(convs)
            results = self.client.complete_many([convs[i] for i in ids])
            for i, res in zip(ids, results):
                req = requests[i]
                attempts[i] += res.attempts
                base = self._base(req)
                if not res.ok:
                    out[i] = Verdict(**base, scores=None, error=f"request failed: {res.error}", attempts=attempts[i],
                                     asks=round_ + 1)
                    del convs[i]
                    continue
                try:
                    scores = self.parse(res.text, len(req.testpoints))
                except VerdictError as exc:
                    if round_ == self.parse_retries:
                        out[i] = Verdict(**base, scores=None, error=f"unparsable answer: {exc}",
                                         attempts=attempts[i], answer=res.text, asks=round_ + 1)
                        del convs[i]
                    else:
                        convs[i] = convs[i] + [
                            {"role": "assistant", "content": res.text},
                            {"role": "user", "content": f"Your answer could not be read ({exc}). Reply again in "
                                                        f"the required format, with exactly {len(req.testpoints)} "
                                                        f"scores inside <score>[...]</score>."}]
                    continue
                out[i] = Verdict(**base, scores=scores, attempts=attempts[i], answer=res.text, asks=round_ + 1)
                del convs[i]
        return [out[i] for i in range(len(requests))]

    def _judge_fresh(self, requests: list[JudgeRequest]) -> list[Verdict]:
        """Up to parse_retries + 1 single-turn asks of the same question per image; a failed
        request uses up an attempt as an unreadable answer does (the official scorer's loop)."""
        messages = {i: [self._first_message(r)] for i, r in enumerate(requests)}
        out: dict[int, Verdict] = {}
        attempts = {i: 0 for i in messages}
        last: dict[int, tuple[str, str | None]] = {}
        todo = list(messages)
        asks = 0
        while todo and asks <= self.parse_retries:
            asks += 1
            results = self.client.complete_many([messages[i] for i in todo])
            again = []
            for i, res in zip(todo, results):
                req = requests[i]
                attempts[i] += res.attempts
                if not res.ok:
                    last[i] = (f"request failed: {res.error}", None)
                    again.append(i)
                    continue
                try:
                    scores = self.parse(res.text, len(req.testpoints))
                except VerdictError as exc:
                    last[i] = (f"unparsable answer: {exc}", res.text)
                    again.append(i)
                    continue
                out[i] = Verdict(**self._base(req), scores=scores, attempts=attempts[i], answer=res.text, asks=asks)
            todo = again
        for i in todo:
            error, answer = last[i]
            out[i] = Verdict(**self._base(requests[i]), scores=None, error=f"{error} (after {asks} fresh attempts)",
                             attempts=attempts[i], answer=answer, asks=asks)
        return [out[i] for i in range(len(requests))]


# ---- aggregation --------------------------------------------------------------------------------
def aggregate(verdicts: list[dict]) -> dict:
    """Sub-dimension, primary (pooled) and overall scores in percent, with failure counts."""
    sub: dict[str, list[int]] = {}  # name -> [passed, judged]
    lost: dict[str, int] = {}  # testpoints of failed images, per sub-dimension
    n_ok = n_fail = 0
    for v in verdicts:
        if v.get("scores") is None:
            n_fail += 1
            for tp in v["testpoints"]:
                lost[tp] = lost.get(tp, 0) + 1
            continue
        n_ok += 1
        for tp, s in zip(v["testpoints"], v["scores"]):
            cell = sub.setdefault(tp, [0, 0])
            cell[0] += int(s == 1)
            cell[1] += 1
    prim: dict[str, list[int]] = {}
    for tp, (k, n) in sub.items():
        cell = prim.setdefault(primary_of(tp), [0, 0])
        cell[0] += k
        cell[1] += n
    order = list(PRIMARY_DIMENSIONS) + sorted(set(prim) - set(PRIMARY_DIMENSIONS))
    primary = {p: {"score": 100.0 * prim[p][0] / prim[p][1], "passed": prim[p][0], "judged": prim[p][1]}
               for p in order if p in prim and prim[p][1]}
    sub_order = [s for s in SUBDIMENSIONS if s in sub] + sorted(set(sub) - set(SUBDIMENSIONS))
    subdims = {s: {"primary": primary_of(s), "score": 100.0 * sub[s][0] / sub[s][1], "passed": sub[s][0],
                   "judged": sub[s][1], "failed": lost.get(s, 0)} for s in sub_order}
    overall = sum(v["score"] for v in primary.values()) / len(primary) if primary else float("nan")
    # Sensitivity: every failed testpoint counted as 0.
    prim0: dict[str, list[int]] = {p: list(c) for p, c in prim.items()}
    for tp, m in lost.items():
        cell = prim0.setdefault(primary_of(tp), [0, 0])
        cell[1] += m
    as_zero = [100.0 * k / n for k, n in prim0.values() if n]
    return {"overall": overall, "primary": primary, "sub": subdims, "images": n_ok + n_fail, "judged_images": n_ok,
            "failed_images": n_fail, "failed_testpoints": sum(lost.values()),
            "missing_primaries": [p for p in PRIMARY_DIMENSIONS if p not in primary],
            "overall_failures_as_zero": sum(as_zero) / len(as_zero) if as_zero else float("nan")}


# ---- a scoring run ------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_cache(path: Path) -> dict[tuple[str, str], dict]:
    cache: dict[tuple[str, str], dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run: that image is asked again
            cache[(rec["image"], rec["judge"])] = rec
    return cache


def requests_for_run(run_dir: Path, overrides: dict[str, tuple[list[str], list[str]]] | None = None
                     ) -> list[JudgeRequest]:
    """One request per image of the run; `overrides` (item key -> testpoints, descriptions)
    replaces the testpoints the run was generated with (see `testpoints` of score_run)."""
    manifest = load_manifest(run_dir)
    reqs, missing = [], []
    for it in manifest["items"]:
        md = it.get("metadata") or {}
        if "testpoints" not in md:
            raise EvalError(f"{run_dir}: item {it['key']} has no UniGenBench testpoints; was the run generated "
                            f"from the UniGenBench CSV (--benchmark unigenbench)?")
        points, descs = overrides[it["key"]] if overrides is not None else (md["testpoints"], md["descriptions"])
        for f in it["files"]:
            p = run_dir / f
            if not p.is_file():
                missing.append(f)
                continue
            reqs.append(JudgeRequest(f, p, it["prompt"], points, descs))
    if missing:
        raise EvalError(f"{run_dir}: {len(missing)} image(s) not generated yet (e.g. {missing[0]}); finish "
                        f"`flowgrpo eval generate` first (it resumes)")
    return reqs


def score_run(run_dir: str | Path, config: ChatConfig, out_dir: str | Path | None = None, parse_retries: int = 2,
              retry_failures: bool = False, chunk: int | None = None, image_format: str = "PNG",
              progress: bool = True, image_quality: int = 95, parser: str = "strict",
              retry_style: str = "correct", template_file: str | Path | None = None,
              template_syntax: str | None = None, testpoints: str | Path | None = None) -> dict:
    """Judge every image of a UniGenBench run (resuming from verdicts.jsonl) and write
    scores.json, primary.csv, subdimensions.csv and scores.md into `out_dir`.

    `testpoints`: a UniGenBench CSV whose testpoints replace the run's (same indices and
    prompts required); `template_file`: the question's template (unigenbench_protocol.py)."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "scores" / "unigenbench"
    overrides, changed = None, []
    if testpoints:
        overrides, changed = testpoint_overrides(load_manifest(run_dir)["items"], testpoints)
    prompt = ScorerPrompt.from_file(template_file, template_syntax) if template_file else ScorerPrompt()
    reqs = requests_for_run(run_dir, overrides)
    if prompt.user_definitions:
        prompt.check_testpoints(tp for r in reqs for tp in r.testpoints)
    judge = UniGenBenchJudge(config, parse_retries, image_format, image_quality, parser, retry_style, prompt)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / VERDICTS
    cache = load_cache(cache_path)
    for r in reqs:
        r.sha = _sha(r.image_path)

    def reusable(rec: dict | None, r: JudgeRequest) -> bool:
        return (rec is not None and rec.get("sha") == r.sha and rec.get("testpoints") == r.testpoints
                and rec.get("protocol", "project/strict") == judge.protocol
                and (rec.get("scores") is not None or not retry_failures))

    todo = [r for r in reqs if not reusable(cache.get((r.image_file, config.model)), r)]
    step = chunk or max(1, 4 * config.concurrency)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="judging", unit="img")
    with cache_path.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), step):
            for v in judge.judge(todo[start:start + step]):
                rec = v.to_json()
                cache[(v.image, config.model)] = rec
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            if bar is not None:
                bar.update(len(todo[start:start + step]))
    if bar is not None:
        bar.close()
    verdicts = [cache[(r.image_file, config.model)] for r in reqs]
    result = aggregate(verdicts)
    result.update({"metric": "unigenbench", "judge": config.model, "judge_url": config.base_url,
                   "run": str(run_dir), "asked_this_time": len(todo),
                   "protocol": {"template": prompt.template.source if prompt.template else "project",
                                "parser": parser, "retry_style": retry_style, "parse_retries": parse_retries,
                                "image_format": judge.image_format, "image_quality": judge.image_quality,
                                "max_tokens": config.max_tokens, "temperature": config.temperature},
                   "testpoints_file": str(testpoints) if testpoints else None,
                   "testpoints_changed": changed,
                   "testpoints_judged": sum(len(r.testpoints) for r in reqs),
                   "failures": [{"image": v["image"], "error": v["error"]} for v in verdicts if v["scores"] is None]})
    write_outputs(result, out)
    return result


def write_outputs(result: dict, out: Path) -> None:
    (out / "scores.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    with (out / "primary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dimension", "score", "passed", "judged"])
        for p, v in result["primary"].items():
            w.writerow([p, f"{v['score']:.2f}", v["passed"], v["judged"]])
        w.writerow(["Overall", f"{result['overall']:.2f}", "", ""])
    with (out / "subdimensions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sub_dimension", "primary", "score", "passed", "judged", "failed"])
        for s, v in result["sub"].items():
            w.writerow([s, v["primary"], f"{v['score']:.2f}", v["passed"], v["judged"], v["failed"]])
    (out / "scores.md").write_text(markdown_table(result))


def markdown_table(result: dict) -> str:
    lines = [f"# UniGenBench: overall {result['overall']:.2f}", "",
             f"Judge `{result.get('judge', '?')}`; {result['judged_images']} of {result['images']} images judged, "
             f"**{result['failed_images']} failed** ({result['failed_testpoints']} testpoints not scored; "
             f"overall with failures as 0: {result['overall_failures_as_zero']:.2f}).", ""]
    proto = result.get("protocol")
    if proto and (proto["template"] != "project" or proto["parser"] != "strict" or proto["retry_style"] != "correct"):
        lines += [f"Protocol: template `{proto['template']}`, parser {proto['parser']}, {proto['retry_style']} "
                  f"retries ({proto['parse_retries']}).", ""]
    if result.get("testpoints_file"):
        changed = result.get("testpoints_changed") or []
        lines += [f"Testpoints from `{result['testpoints_file']}` ({result.get('testpoints_judged', '?')} judged "
                  f"testpoints); prompts whose testpoints differ from the run's: "
                  f"{', '.join(changed) if changed else 'none'}.", ""]
    if result.get("missing_primaries"):
        lines += [f"Primary dimensions without any judged testpoint: {', '.join(result['missing_primaries'])}", ""]
    lines += ["| Primary dimension | Score | Passed / judged |", "|---|---:|---:|"]
    for p, v in result["primary"].items():
        lines.append(f"| {p} | {v['score']:.2f} | {v['passed']} / {v['judged']} |")
    lines += [f"| **Overall** | **{result['overall']:.2f}** | |", "",
              "| Sub-dimension | Primary | Score | Passed / judged | Failed |", "|---|---|---:|---:|---:|"]
    for s, v in result["sub"].items():
        lines.append(f"| {s} | {v['primary']} | {v['score']:.2f} | {v['passed']} / {v['judged']} | {v['failed']} |")
    return "\n".join(lines) + "\n"

"""What the UniGenBench judge is asked and how its answer is read.

**The question.** By default the project's own wording (`judge_instruction`): the prompt, the
numbered testpoints with what each sub-dimension checks (our definitions, benchmarks.
SUBDIMENSIONS) and what it means in this prompt, and the answer format below. The official
evaluation models were trained on the official wording; a user points `template_file` at
their own copy of it (see docs/evaluation.md for where it lives and how to export it). A
template is filled with these placeholders (the official template's names):

    {prompt}            the image's prompt
    {testpoint}         the testpoint names as a Python list literal, "['Style', 'World Knowledge']"
    {explanation}       the definitions block: HEADER:「 then one line "NAME: DEFINITION" per
                        testpoint, then a line 」 (DEFINITIONS_HEADER, the definitions)
    {test_explanation}  the descriptions block, the same shape: one line "NAME: DESCRIPTION"
                        per testpoint, the CSV's Testpoint Description (DESCRIPTIONS_HEADER)

A `.json` template file may also carry "definitions" (testpoint name -> definition, replacing
ours: then every testpoint of the run needs one), "definitions_header" and
"descriptions_header" (the block headers), and "syntax" ("plain" or "format"; see
flowgrpo.prompt_templates).

**The answer.** Two parsers:

- `strict` (default): the LAST <score> block outside <think>...</think> must be a JSON list of
  exactly n integers 0 or 1.
- `official`: the official scorer's reading: the FIRST <analysis> block and the FIRST <score>
  block (tags case-sensitive, anywhere in the answer, so a <description> wrapper is optional),
  each a Python list literal, both exactly n long. The official scorer then counts a score
  equal to 1 as passed and anything else as failed; here a value other than 0 or 1 (True,
  1.0 and 0.0 count as 1 and 0) makes the answer unreadable instead of silently 0.

Either parser raises VerdictError with the reason; the judge then asks again (see
unigenbench.py) and finally records the image as a failure.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass, field

from .. import prompt_templates
from .benchmarks import SUBDIMENSIONS, EvalError

PLACEHOLDERS = ("prompt", "testpoint", "explanation", "test_explanation")
PARSERS = ("strict", "official")
DEFINITIONS_HEADER = "What each checkpoint checks"
DESCRIPTIONS_HEADER = "What each checkpoint means for this prompt"


class VerdictError(ValueError):
    """A judge answer that does not follow the required format."""


# ---- the question -------------------------------------------------------------------------------
def judge_instruction(prompt: str, testpoints: list[str], descriptions: list[str]) -> str:
    """The project's own wording of the question (the default)."""
    lines = [
        "You are checking whether an AI-generated image follows its text prompt.",
        f"The prompt was:\n<prompt>{prompt}</prompt>",
        "Check the image against each numbered checkpoint. A checkpoint scores 1 only if the image clearly "
        "shows what it asks for; otherwise it scores 0. Judge only what is visible in the image.",
        "",
        "Checkpoints:",
    ]
    for i, (tp, desc) in enumerate(zip(testpoints, descriptions), 1):
        definition = SUBDIMENSIONS.get(tp, "as its name says")
        lines.append(f"{i}. {tp} (checks {definition}). In this prompt: {desc}")
    n = len(testpoints)
    lines += [
        "",
        "Reply in exactly this format and nothing else:",
        f"<analysis>[a list of {n} short strings, one per checkpoint, in order]</analysis>",
        f"<score>[a list of {n} integers, each 0 or 1, one per checkpoint, in order]</score>",
    ]
    return "\n".join(lines)


def _block(header: str, rows) -> str:
    return f"{header}:\u300c" + "".join(f"\n{name}: {text}" for name, text in rows) + "\n\u300d"


@dataclass
class ScorerPrompt:
    """The question asked about one image: the project's wording, or a user's template."""

    template: prompt_templates.Template | None = None  # None: judge_instruction
    definitions: dict[str, str] = field(default_factory=lambda: dict(SUBDIMENSIONS))
    definitions_header: str = DEFINITIONS_HEADER
    descriptions_header: str = DESCRIPTIONS_HEADER
    user_definitions: bool = False

    @classmethod
    def from_file(cls, path, syntax: str | None = None) -> ScorerPrompt:
        try:
            tpl = prompt_templates.check(prompt_templates.load(path, syntax), PLACEHOLDERS, ("prompt",),
                                         "UniGenBench template")
        except prompt_templates.TemplateError as exc:
            raise EvalError(str(exc)) from None
        extras = dict(tpl.extras)
        defs = extras.pop("definitions", None)
        if defs is not None and not (isinstance(defs, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                    for k, v in defs.items())):
            raise EvalError(f"template file {path}: \"definitions\" must map testpoint names to strings")
        headers = {}
        for key in ("definitions_header", "descriptions_header"):
            if key in extras:
                value = extras.pop(key)
                if not isinstance(value, str):
                    raise EvalError(f"template file {path}: \"{key}\" must be a string")
                headers[key] = value
        if extras:
            raise EvalError(f"template file {path}: unknown key(s) {sorted(extras)}; a UniGenBench template file "
                            f"holds template, syntax, definitions, definitions_header, descriptions_header")
        spec = cls(tpl, **headers)
        if defs is not None:
            spec.definitions, spec.user_definitions = dict(defs), True
        return spec

    @property
    def protocol(self) -> str:
        """'project', or a hash of everything that shapes the question (cached verdicts are
        reused only under the same protocol)."""
        if self.template is None:
            return "project"
        h = hashlib.sha256(json.dumps([self.template.text, self.template.syntax, self.definitions,
                                       self.definitions_header, self.descriptions_header],
                                      sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        return "template:" + h[:12]

    def check_testpoints(self, testpoints) -> None:
        """With user definitions, every testpoint needs one (the official scorer stops too)."""
        missing = sorted({tp for tp in testpoints if tp not in self.definitions})
        if missing:
            raise EvalError(f"the template file's \"definitions\" lack testpoint(s) {missing}")

    def text(self, prompt: str, testpoints: list[str], descriptions: list[str]) -> str:
        if self.template is None:
            return judge_instruction(prompt, testpoints, descriptions)
        if self.user_definitions:
            self.check_testpoints(testpoints)
        explanation = _block(self.definitions_header,
                             ((tp, self.definitions.get(tp, "as its name says")) for tp in testpoints))
        test_explanation = _block(self.descriptions_header, zip(testpoints, descriptions))
        return self.template.fill(prompt=prompt, testpoint=str(list(testpoints)), explanation=explanation,
                                  test_explanation=test_explanation)


# ---- the answer ---------------------------------------------------------------------------------
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_SCORE = re.compile(r"<score>(.*?)</score>", re.S | re.I)
_FIRST_ANALYSIS = re.compile(r"<analysis>(.*?)</analysis>", re.S)
_FIRST_SCORE = re.compile(r"<score>(.*?)</score>", re.S)


def parse_scores(text: str, n: int) -> list[int]:
    """The 0/1 list of the last <score> block; raises VerdictError unless it holds exactly n of them."""
    body = _THINK.sub("", text or "")
    blocks = _SCORE.findall(body)
    if not blocks:
        raise VerdictError("no <score>[...]</score> block")
    raw = blocks[-1].strip()
    try:
        values = json.loads(raw)
    except json.JSONDecodeError:
        raise VerdictError(f"the <score> block is not a list of integers: {raw[:80]!r}") from None
    if not isinstance(values, list):
        raise VerdictError(f"the <score> block is not a list: {raw[:80]!r}")
    if len(values) != n:
        raise VerdictError(f"the <score> list has {len(values)} entries for {n} checkpoints")
    if not all(type(v) is int and v in (0, 1) for v in values):
        raise VerdictError(f"every score must be the integer 0 or 1: {raw[:80]!r}")
    return values


def _literal_list(raw: str, tag: str) -> list:
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise VerdictError(f"the <{tag}> block is not a Python list literal: {raw.strip()[:80]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise VerdictError(f"the <{tag}> block is not a list: {raw.strip()[:80]!r}")
    return list(value)


def parse_scores_official(text: str, n: int) -> list[int]:
    """The official reading (module docstring): the first <analysis> and <score> blocks."""
    analysis_m = _FIRST_ANALYSIS.search(text or "")
    score_m = _FIRST_SCORE.search(text or "")
    if analysis_m is None or score_m is None:
        missing = [t for t, m in (("<analysis>", analysis_m), ("<score>", score_m)) if m is None]
        raise VerdictError(f"no {' and no '.join(missing)} block (the official format needs both)")
    analysis = _literal_list(analysis_m.group(1), "analysis")
    scores = _literal_list(score_m.group(1), "score")
    if len(analysis) != n or len(scores) != n:
        raise VerdictError(f"the first <analysis> has {len(analysis)} and the first <score> {len(scores)} entries "
                           f"for {n} checkpoints")
    out = []
    for v in scores:
        if not isinstance(v, (int, float)) or v not in (0, 1):
            raise VerdictError(f"every score must be 0 or 1, got {v!r} (the official scorer would count it as 0)")
        out.append(int(v))
    return out


PARSE = {"strict": parse_scores, "official": parse_scores_official}


# ---- another testpoint file ---------------------------------------------------------------------
def testpoint_overrides(items: list[dict], path) -> tuple[dict[str, tuple[list[str], list[str]]], list[str]]:
    """Testpoints and descriptions per item key from another UniGenBench CSV (e.g. the
    Aug-2025 file), checked against the run's prompts; also the keys whose testpoints differ
    from the run's own. Every item of the run must be in the file with the same prompt."""
    from .benchmarks import load_unigenbench_csv

    rows = {it.key: it for it in load_unigenbench_csv(path)}
    out, changed = {}, []
    for it in items:
        row = rows.get(it["key"])
        if row is None:
            raise EvalError(f"--testpoints {path}: no row with index {it['key']} (the run has that prompt)")
        if row.prompt != it["prompt"].strip():
            raise EvalError(f"--testpoints {path}: index {it['key']} has another prompt than the run "
                            f"({row.prompt[:60]!r} vs {it['prompt'][:60]!r}); the file must be a version of "
                            f"the benchmark the run was generated from")
        pair = (row.metadata["testpoints"], row.metadata["descriptions"])
        md = it.get("metadata") or {}
        if (md.get("testpoints"), md.get("descriptions")) != pair:
            changed.append(it["key"])
        out[it["key"]] = pair
    return out, changed

"""The rules that keep README.md and docs/ true to the repository (run by tests/test_docs.py).

- Links: every relative link resolves to a file, and every `#anchor` to a heading of it
  (GitHub's slugs).
- Paths: a backticked path whose first part is a folder of this repository (`src/`, `docs/`,
  `configs/`, ...) or `Makefile` names something that exists. Paths below OUTPUT_PREFIXES are
  what commands write (`runs/...`, `data/...`), so they need not exist in a clone.
- Commands: every `flowgrpo ...` shown (in backticks or a code block) names subcommands and flags
  that the CLI's argparse parser has. Upper-case words are placeholders; `[...]` marks optional parts.
  A `flowgrpo train CONFIG overrides` line whose CONFIG is in the repository loads and validates.
- Config keys: every `section.key` of a training config named in backticks or as a command's
  `key=value` override exists in `src/flowgrpo/train_config.py`.
- History: no session or issue numbers and no words that date a statement (HISTORY everywhere,
  PROSE_HISTORY in prose: README, docs, config comments). Docs describe the project as it is.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What commands write: a clone does not hold these, so a doc may name them freely.
OUTPUT_PREFIXES = ("runs/", "data/", "exports/", "refs/", "models/", "RUN/", "OUT/")
REPO_FOLDERS = ("src/", "docs/", "configs/", "scripts/", "tests/", "assets/")

# A clone has no ../shared: docs and recipes point at data/ (flowgrpo data fetch).
OUTSIDE = re.compile(r"\.\./shared\b")

HISTORY = re.compile(
    r"\bsessions? \d|\(session|session-\d|\bissues? #?\d|\bfor the record\b|\bpreviously\b"
    r"|\buntil (?:session|issue|now|recently|then)\b|\bsince (?:session|issue)\b|\bused to be\b"
    r"|\b(?:the|this) issue\b", re.I)
PROSE_HISTORY = re.compile(
    r"\(new\)|\bnew:|\bthe new (?:base|model|config|recipe|demo|version|layout|default|option)s?\b|\bnewly\b"
    r"|\bnow (?:trains|runs|uses|ships|reads|decays|names|holds|draws|meets)\b"
    r"|\bthe (?:old|previous|earlier) (?:base|model|config|recipe|demo|version|layout|default|session)s?\b",
    re.I)

# Pages that quote the official repositories' files (and the GPU recipes, configs/recipes/): their
# `scripts/...` paths are upstream paths.
UPSTREAM_SCRIPTS = {"docs/fidelity.md"}

CONFIG_SECTIONS = ("model", "data", "sample", "reward", "optim", "run", "parallel")


def doc_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- markdown structure ----------------------------------------------------------------------

def split_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code-block lines), each as (line number, text)."""
    prose, code, fenced = [], [], False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced or line.startswith("    ") and line.strip() else prose).append((i, line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    prose, _ = split_code(path.read_text())
    for _, line in prose:
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            seen[s] = n + 1
    return out


def prose_spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Inline code spans with the line they start on; a span may wrap onto the next lines of its
    paragraph (it is read with the line breaks as spaces)."""
    spans, para = [], []
    for n, line in prose + [(0, "")]:
        if line.strip():
            para.append((n, line))
            continue
        offsets, text = [], ""
        for pn, pl in para:
            offsets.append((len(text), pn))
            text += pl + " "
        for m in re.finditer(r"`([^`]+)`", text):
            spans.append((max(pn for off, pn in offsets if off <= m.start()), m.group(1)))
        para = []
    return spans


# ---- the checks -------------------------------------------------------------------------------

def check_links(path: Path, text: str) -> list[str]:
    errors = []
    prose, _ = split_code(text)
    for n, line in prose:
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                errors.append(f"{rel(path)}:{n}: link target {target!r} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                errors.append(f"{rel(path)}:{n}: no heading for anchor #{anchor} in {rel(dest)}")
    return errors


def _path_like(token: str, folders: tuple[str, ...] = REPO_FOLDERS) -> str | None:
    token = token.split("::")[0].rstrip(".,:;")
    if " " in token or not re.fullmatch(r"[\w.\-/*]+(#[\w\-]+)?", token):
        return None
    if token.startswith(folders) or token == "Makefile":
        return token
    return None


def check_paths(path: Path, text: str) -> list[str]:
    errors = []
    prose, code = split_code(text)
    tokens = [(n, t) for n, span in prose_spans(prose) for t in span.split()]
    tokens += [(n, t) for n, line in code for t in line.split()]
    upstream = rel(path) in UPSTREAM_SCRIPTS or rel(path).startswith("configs/recipes/")
    folders = tuple(f for f in REPO_FOLDERS if not (upstream and f == "scripts/"))
    for n, token in tokens:
        p = _path_like(token.strip("()"), folders)
        if p is None or p.startswith(OUTPUT_PREFIXES):
            continue
        file_part, _, anchor = p.partition("#")
        matches = list(ROOT.glob(file_part)) if "*" in file_part else [ROOT / file_part]
        if not matches or not matches[0].exists():
            errors.append(f"{rel(path)}:{n}: path {p!r} does not exist "
                          f"(outputs go under {', '.join(OUTPUT_PREFIXES[:4])})")
        elif anchor and matches[0].suffix == ".md" and anchor not in anchors(matches[0]):
            errors.append(f"{rel(path)}:{n}: no heading for anchor #{anchor} in {file_part}")
    return errors


def commands_in(text: str) -> list[tuple[int, str]]:
    """Every `flowgrpo ...` command: inline spans, and code lines (with \\ continuations)."""
    prose, code = split_code(text)
    found = [(n, span) for n, span in prose_spans(prose) if span.startswith("flowgrpo ")]
    pending, start = "", 0
    for n, line in code:
        body = line.strip().removeprefix("$ ")
        if pending:
            pending += " " + body
        elif re.match(r"(?:[A-Z_]+=\S+ )*(?:accelerate launch .*?|torchrun .*?)?-m flowgrpo |flowgrpo ", body):
            pending, start = body, n
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        found.append((start, re.sub(r"^.*?-m flowgrpo ", "flowgrpo ", pending)))
        pending = ""
    return found


def _tokens(command: str) -> list[str]:
    command = re.sub(r"\s#.*$", "", command)  # a trailing comment
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    out = []
    for w in words:
        w = w.removeprefix("(").removesuffix(")")
        if w.startswith("[") and not w.startswith("[["):
            w = w[1:]
        if w.endswith("]") and "=[" not in w and "[" not in w:
            w = w[:-1]
        if w and w not in ("...", "|"):
            out.append(w)
    return out


def check_command(command: str) -> list[str]:
    """Problems with one `flowgrpo ...` line: unknown subcommand or flag."""
    import argparse

    from flowgrpo.cli import build_parser

    parser = build_parser()
    words = _tokens(command)[1:]
    errors = []
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        if not words:
            break  # the command group itself (`flowgrpo eval`)
        if words[0] not in subs[0].choices:
            return [f"unknown subcommand {words[0] if words else '(none)'!r}; "
                    f"has {', '.join(subs[0].choices)}"]
        parser, words = subs[0].choices[words[0]], words[1:]
    for w in words:
        if w.startswith("--"):
            flag = w.split("=")[0]
            if flag not in parser._option_string_actions:
                errors.append(f"{parser.prog} has no flag {flag}")
    return errors


def check_train_config(command: str) -> list[str]:
    """A `flowgrpo train CONFIG overrides` line whose CONFIG is a repository file must load and
    validate with its overrides (placeholder values such as `model.path=BASE` are left out)."""
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig, validate

    words = _tokens(command)
    if len(words) < 3 or words[1] != "train" or not (ROOT / words[2]).is_file():
        return []
    overrides = [w for w in words[3:] if "=" in w and not w.startswith("-")
                 and not re.search(r"=[A-Z_]+$|\[[A-Z, ]+\]", w)]
    try:
        validate(load_config(TrainConfig, ROOT / words[2], overrides))
    except Exception as exc:  # noqa: BLE001 - any failure to load is what the check reports
        return [f"the config does not load: {str(exc).splitlines()[0]}"]
    return []


def config_keys_in(text: str) -> list[tuple[int, str]]:
    prose, _ = split_code(text)
    keys = []
    pattern = re.compile(rf"^({'|'.join(CONFIG_SECTIONS)})\.[a-z_][\w.]*")
    for n, span in prose_spans(prose):
        for word in span.split():
            m = pattern.match(word.strip("'\"["))
            if m and not re.search(r"\.(py|md|ya?ml|json|jsonl|txt|csv|png)$", m.group(0)):
                keys.append((n, m.group(0).rstrip(".")))
    for n, command in commands_in(text):
        for word in _tokens(command):
            m = pattern.match(word.strip("'\""))
            if m and "=" in word:
                keys.append((n, m.group(0).rstrip(".")))
    return keys


def config_key_exists(key: str) -> bool:
    from flowgrpo.train_config import TrainConfig

    cls: typing.Any = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return True  # below a dict field (reward.weights.NAME): free-form
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return False
        hints = typing.get_type_hints(cls)
        cls = hints[part]
    return True


def check_history(label: str, lines: list[tuple[int, str]], prose: bool) -> list[str]:
    errors = []
    for n, line in lines:
        if prose and OUTSIDE.search(line):
            errors.append(f"{label}:{n}: points at ../shared, which a clone does not have; use data/ "
                          f"(flowgrpo data fetch NAME)")
        for rx in (HISTORY, PROSE_HISTORY) if prose else (HISTORY,):
            m = rx.search(line)
            if m:
                errors.append(f"{label}:{n}: history word {m.group(0)!r}: say what holds, and put findings "
                              f"on a results page")
    return errors


def check_doc(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text() if text is None else text
    errors = check_links(path, text) + check_paths(path, text)
    for n, command in commands_in(text):
        problems = check_command(command)
        errors += [f"{rel(path)}:{n}: `{command}`: {e}" for e in problems or check_train_config(command)]
    for n, key in config_keys_in(text):
        if not config_key_exists(key):
            errors.append(f"{rel(path)}:{n}: config key {key!r} is not in src/flowgrpo/train_config.py")
    errors += check_history(rel(path), list(enumerate(text.splitlines(), 1)), prose=True)
    return errors


def yaml_comment_lines(text: str) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        hash_at = line.find("#")
        if hash_at >= 0 and (hash_at == 0 or line[hash_at - 1] in " \t"):
            out.append((n, line[hash_at:]))
    return out


def check_config_comments(path: Path, text: str | None = None) -> list[str]:
    text = path.read_text() if text is None else text
    comments = yaml_comment_lines(text)
    errors = check_history(rel(path), comments, prose=True)
    for n, line in comments:
        for token in re.findall(r"(?:src|docs|configs|scripts|tests|assets)/[\w.\-/]*[\w\-](?:#[\w\-]+)?", line):
            errors += check_paths(path, "\n" * (n - 1) + f"`{token}`")
    return errors


def check_code(path: Path) -> list[str]:
    """History words, and every `docs/...md#anchor` a comment or docstring points at."""
    text = path.read_text()
    errors = check_history(rel(path), list(enumerate(text.splitlines(), 1)), prose=False)
    for n, line in enumerate(text.splitlines(), 1):
        for link in re.findall(r"docs/[\w\-/]+\.md(?:#[\w\-]+)?", line):
            errors += check_paths(path, "\n" * (n - 1) + f"`{link}`")
    return errors


def check_test_names() -> list[str]:
    errors = []
    bad = re.compile(r"(?:^|_)(?:new|session\d*|issue\d*)(?:_|$)")
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if bad.search(path.stem.removeprefix("test_")):
            errors.append(f"{rel(path)}: the file name dates the tests; name what they test")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r"\s*def (test_\w+)", line)
            if m and bad.search(m.group(1).removeprefix("test_")):
                errors.append(f"{rel(path)}:{n}: {m.group(1)} dates the test; name what it checks")
    return errors

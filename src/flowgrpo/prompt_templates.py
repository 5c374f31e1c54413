"""Judge and scorer prompts read at run time from a file the user points to.

A judge model answers best in the wording it was trained on. flowgrpo ships its own wording
and never another project's; a user who wants the exact training prompt of a checkpoint
points `template_file` at a copy taken from their own checkout of the official repository
(docs/rewards.md and docs/evaluation.md say where each one lives).

A template file is either

- plain text (any suffix but .json): the whole file is the template, sent verbatim with its
  placeholders filled; or
- a JSON object (suffix .json): {"template": "...", "syntax": "plain" | "format", ...}; the
  other keys are extras a caller may read (UniGenBench: "definitions", "definitions_header",
  "descriptions_header").

Placeholders are names in braces, `{prompt}`; each caller documents its own. Two syntaxes:

- `plain` (default): only the caller's placeholder names are replaced, in one pass (a caption
  that itself contains "{prompt}" is not expanded again); every other character, braces
  included, is sent as written.
- `format`: Python's str.format, as the official code fills its templates (`{{` and `}}`
  become single braces; any other brace must be a known placeholder). Use it for a template
  copied out of Python source that is filled with `.format(...)`, e.g. one whose example JSON
  is written with doubled braces.
"""

from __future__ import annotations

import json
import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SYNTAXES = ("plain", "format")


class TemplateError(ValueError):
    """A template file that cannot be used, with what to change."""


@dataclass
class Template:
    text: str
    syntax: str = "plain"
    source: str = "built-in"  # the file read, or "built-in"
    extras: dict = field(default_factory=dict)  # the other keys of a JSON template file

    def fill(self, **values: str) -> str:
        return fill(self.text, values, self.syntax)


def fill(text: str, values: dict[str, str], syntax: str = "plain") -> str:
    """`text` with each `{name}` of `values` replaced (see the module docstring)."""
    if syntax == "format":
        return text.format_map(values)
    if not values:
        return text
    pattern = re.compile("|".join(re.escape("{" + k + "}") for k in values))
    return pattern.sub(lambda m: str(values[m.group(0)[1:-1]]), text)


def placeholders(text: str, syntax: str = "plain", names=()) -> set[str]:
    """The placeholder names a template uses (plain: only those among `names`)."""
    if syntax == "format":
        return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    return {n for n in names if "{" + n + "}" in text}


def check(template: Template, names: tuple[str, ...], required: tuple[str, ...] = ("prompt",),
          what: str = "template") -> Template:
    """Raise TemplateError unless `template` uses the required placeholders and, with the
    `format` syntax, only known ones; warn about doubled braces in a plain template."""
    if template.syntax not in SYNTAXES:
        raise TemplateError(f"{what} {template.source}: syntax must be one of {SYNTAXES}, got {template.syntax!r}")
    known = ", ".join("{" + n + "}" for n in names)
    if template.syntax == "format":
        bad = None
        try:
            used = placeholders(template.text, "format")
        except ValueError as exc:
            used, bad = set(), exc
        unknown = used - set(names)
        if unknown:
            raise TemplateError(f"{what} {template.source}: unknown placeholder(s) {sorted(unknown)}; known: {known} "
                                f"(with the format syntax write literal braces as {{{{ and }}}})")
        if bad is None:
            try:
                fill(template.text, {n: "" for n in names}, "format")
            except (ValueError, KeyError, IndexError, AttributeError) as exc:
                bad = exc
        if bad is not None:
            raise TemplateError(f"{what} {template.source}: not a valid str.format template ({bad}); known "
                                f"placeholders: {known}; write literal braces as {{{{ and }}}}, or use syntax "
                                f"'plain'")
    else:
        used = placeholders(template.text, "plain", names)
        if "{{" in template.text or "}}" in template.text:
            log.warning("%s %s holds doubled braces {{ }} and is filled with the plain syntax, so they are sent "
                        "as written; if it was taken from Python source filled with .format(), set syntax "
                        "'format'", what, template.source)
    missing = [n for n in required if n not in used]
    if missing:
        raise TemplateError(f"{what} {template.source} must contain the placeholder(s) "
                            f"{', '.join('{' + n + '}' for n in missing)}")
    return template


def load(path: str | Path, syntax: str | None = None) -> Template:
    """Read a template file (plain text, or a JSON object with "template"); `syntax`, when
    given, overrides the file's own."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"cannot read template file {path}: {exc}") from None
    extras: dict = {}
    file_syntax = "plain"
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TemplateError(f"template file {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("template"), str):
            raise TemplateError(f"template file {path}: a .json template file is an object with a \"template\" "
                                f"string (and optionally \"syntax\" and caller-specific keys)")
        raw = data.pop("template")
        file_syntax = data.pop("syntax", "plain")
        extras = data
    if not raw.strip():
        raise TemplateError(f"template file {path} is empty")
    return Template(raw, syntax or file_syntax, str(path), extras)


def resolve(template_file: str | Path | None, inline: str | None, default: str, names: tuple[str, ...],
            required: tuple[str, ...] = ("prompt",), syntax: str | None = None, what: str = "template") -> Template:
    """The template a caller uses: the file, else the inline text, else the built-in default."""
    if template_file and inline:
        raise TemplateError(f"give either a {what} file or an inline {what}, not both")
    if template_file:
        tpl = load(template_file, syntax)
    elif inline is not None:
        tpl = Template(inline, syntax or "plain", "(inline)")
    else:
        tpl = Template(default, "plain", "built-in")
    return check(tpl, names, required, what)

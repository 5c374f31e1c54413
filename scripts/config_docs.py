"""Regenerate docs/configs.md from the comments in src/flowgrpo/train_config.py.

    python scripts/config_docs.py > docs/configs.md
"""

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "flowgrpo" / "train_config.py"
SECTIONS = {"LoraConfig": "model.lora", "ModelConfig": "model", "DataConfig": "data", "SampleConfig": "sample",
            "RewardConfig": "reward", "OptimConfig": "optim", "RunConfig": "run",
            "ParallelConfig": "parallel"}


def fields():
    section = None
    pending = []
    for line in SRC.read_text().splitlines():
        m = re.match(r"class (\w+):", line)
        if m:
            section = SECTIONS.get(m.group(1))
            pending = []
            continue
        if section is None:
            continue
        c = re.match(r"\s+# (.*)", line)
        if c:
            pending.append(c.group(1))
            continue
        f = re.match(r"\s+(\w+): ([^=]+?) = (.+?)(?:\s+# (.*))?$", line)
        if f:
            name, typ, default, reason = f.groups()
            if default.startswith("field(default_factory="):
                inner = default[len("field(default_factory="):-1]
                default = {"list": "[]", "dict": "{}"}.get(inner, inner.replace("lambda: ", ""))
            yield section, name, typ.strip(), default.strip(), " ".join(pending + [reason or ""]).strip()
            pending = []


def main() -> None:
    out = ["# Training config reference", "",
           "Generated from `src/flowgrpo/train_config.py` by `scripts/config_docs.py`; every field says why it exists.",
           "Set fields in a YAML file or as dotted overrides: `flowgrpo train configs/demo.yaml optim.lr=1e-4`.", ""]
    current = None
    for section, name, typ, default, reason in fields():
        if section != current:
            out += ["", f"## `{section}`", "", "| key | type | default | why |", "| --- | --- | --- | --- |"]
            current = section
        out.append(f"| `{section}.{name}` | `{typ}` | `{default}` | {reason.replace('|', '/')} |")
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()

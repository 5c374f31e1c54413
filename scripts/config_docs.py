"""Regenerate the config reference pages from the comments on each config dataclass field.

    python scripts/config_docs.py > docs/configs.md                   # flowgrpo train
    python scripts/config_docs.py --shapes > docs/shapes-configs.md   # flowgrpo pretrain / distill
"""

import argparse
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "flowgrpo"
TRAIN = [(SRC / "train_config.py",
          {"LoraConfig": "model.lora", "ModelConfig": "model", "DataConfig": "data", "SampleConfig": "sample",
           "RewardConfig": "reward", "OptimConfig": "optim", "ParallelConfig": "parallel", "RunConfig": "run",
           "MonitorConfig": "monitor"})]
SHAPES = [(SRC / "worlds" / "shapes" / "pretrain.py", {"PretrainConfig": "pretrain"}),
          (SRC / "worlds" / "shapes" / "model.py", {"ShapesArchitecture": "pretrain: arch"}),
          (SRC / "worlds" / "shapes" / "distill.py", {"DistillConfig": "distill"})]


def fields(src: Path, sections: dict[str, str]):
    section = None
    pending = []
    for line in src.read_text().splitlines():
        m = re.match(r"class (\w+)", line)
        if m:
            section = sections.get(m.group(1))
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
        elif not line.strip().startswith(('"""', "#")) and line.strip() and not line.startswith(" "):
            section = None


def key_of(section: str, name: str) -> str:
    """The key as a user writes it: `optim.lr` for train configs; top-level `dit_lr` and
    `arch.num_layers` for the shapes configs."""
    if section.startswith("pretrain: "):
        return f"{section.split(': ')[1]}.{name}"
    return name if section in ("pretrain", "distill") else f"{section}.{name}"


def render(sources, title: str, intro: list[str]) -> str:
    out = [f"# {title}", ""] + intro + [""]
    current = None
    for src, sections in sources:
        for section, name, typ, default, reason in fields(src, sections):
            if section != current:
                out += ["", f"## `{section}`", "", "| key | type | default | why |", "| --- | --- | --- | --- |"]
                current = section
            typ, reason = typ.replace(" | ", " or "), reason.replace("|", "/")
            out.append(f"| `{key_of(section, name)}` | `{typ}` | `{default}` | {reason} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", action="store_true", help="the pretrain / distill reference instead of train's")
    args = ap.parse_args()
    if args.shapes:
        page = render(SHAPES, "Shapes-model config reference (`flowgrpo pretrain`, `flowgrpo distill`)", [
            "Generated from `src/flowgrpo/worlds/shapes/pretrain.py`, `model.py` and `distill.py` by "
            "`scripts/config_docs.py --shapes`; every field says why it exists.",
            "Keys are top level (`arch.*` nested under pretrain) and take dotted overrides: "
            "`flowgrpo pretrain configs/pretrain_shapes.yaml dit_steps=2000 arch.num_layers=4`. "
            "What the recipes build: [shapes-world.md](shapes-world.md#building-the-models)."])
    else:
        page = render(TRAIN, "Training config reference", [
            "Generated from `src/flowgrpo/train_config.py` by `scripts/config_docs.py`; every field says why "
            "it exists.",
            "Set fields in a YAML file or as dotted overrides: `flowgrpo train configs/demo.yaml optim.lr=1e-4`."])
    sys.stdout.write(page)


if __name__ == "__main__":
    main()

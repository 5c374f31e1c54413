"""The memory table of docs/models.md, made by `flowgrpo plan` for every recipe.

    python scripts/plan_table.py            # prints the markdown table

Each row: the recipe on 8 GPUs of 80 GB, the sharding that fits, per-GPU memory, and the
launch line (the same command on every node for more machines: docs/models.md, "Launching")."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPUS, MEMORY = 8, 80.0


def rows() -> list[str]:
    from flowgrpo.config import load_config
    from flowgrpo.plan import make_plan
    from flowgrpo.train_config import TrainConfig, validate

    out = ["| recipe | model | trains | sharding on 8 x 80 GB | GB per GPU | launch |", "| --- | --- | --- | --- | --- | --- |"]
    for recipe in sorted((ROOT / "configs" / "recipes").glob("*.yaml")):
        cfg = validate(load_config(TrainConfig, recipe))
        # a recipe that ships a full fine-tune (MixGRPO's) has that row alone
        for full in (False, True) if cfg.model.lora.enabled else (True,):
            over = ["model.lora.enabled=false"] if full and cfg.model.lora.enabled else []
            c = validate(load_config(TrainConfig, recipe, over)) if over else cfg
            plan = make_plan(c, GPUS, MEMORY)
            flags = " ".join(over + (["parallel.strategy=fsdp2"] if plan.strategy != "ddp" else [])
                             + (["parallel.cpu_offload=true"] if "offload" in plan.strategy else []))
            launch = (f"`torchrun --nproc_per_node 8 -m flowgrpo train configs/recipes/{recipe.name}"
                      + (f" {flags}" if flags else "") + "`")
            fits = "" if plan.fits else " (does not fit)"
            out.append(f"| `{recipe.stem}` | {cfg.model.path} | {'full' if full else f'LoRA r {cfg.model.lora.rank}'} "
                       f"| {plan.strategy}{fits} | {plan.total:.1f} | {launch} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))

"""A diffusers-style model card (README.md) for every trained artifact.

`flowgrpo train` writes one into the run's `lora/` (or `model/`) folder and `flowgrpo export`
into the exported pipeline folder, so the folder can be published as it is
(`huggingface-cli upload USER/NAME runs/demo/lora`). The card holds Hub metadata (the licence
is left for the user: it is the base model's), the method and rewards, the recipe and its key
settings, the run's held-out before/after table and grid when the run evaluated, quick-start
code that loads exactly this folder, and the citations of the methods used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

PAIRWISE_REWARDS = {"pref_winrate"}
ADVERSARIAL_REWARDS = {"adversarial"}

CITATIONS = {
    "Flow-GRPO": ("liu2025flowgrpo", "Flow-GRPO: Training Flow Matching Models via Online RL", "2505.05470"),
    "Pref-GRPO": ("wang2025prefgrpo", "Pref-GRPO: Pairwise Preference Reward-based GRPO for Stable "
                                      "Text-to-Image Reinforcement Learning", "2508.20751"),
    "Adv-GRPO": ("mao2025advgrpo", "The Image as Its Own Reward: Reinforcement Learning with Adversarial Reward "
                                "for Image Generation", "2511.20256"),
    "DiffusionNFT": ("zheng2025diffusionnft", "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
                     "2509.16117"),
    "AWM": ("xue2025awm", "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models",
            "2509.25050"),
}

OBJECTIVE_TEXT = {
    "ratio": "the clipped policy-gradient ratio of the SDE sampler's Gaussian step log-probabilities, with "
             "group-normalised advantages",
    "awm": "Advantage Weighted Matching: the clipped ratio with the flow-matching loss of the final sample as "
           "the log-probability surrogate",
    "nft": "DiffusionNFT: flow matching on the model's own samples, split into an implicit positive and negative "
           "policy by the reward, with a velocity-space anchor to the base",
    "reward_filtered": "reward-filtered flow matching (RAFT-style): flow matching on each group's best samples",
    "supervised": "supervised flow matching on renderer targets (a calibration run, not RL)",
}


def method_names(cfg: dict) -> list[str]:
    """The published methods a config trains, in the order they are named."""
    loss = cfg["optim"]["policy_loss"]
    rewards = set(cfg["reward"]["weights"])
    names = {"ratio": [], "awm": ["AWM"], "nft": ["DiffusionNFT"]}.get(loss, [])
    if loss == "ratio":
        names.append("Flow-GRPO-Fast" if cfg["sample"].get("window_size", 0) > 0 else "Flow-GRPO")
    if rewards & PAIRWISE_REWARDS:
        names.append("Pref-GRPO")
    if rewards & ADVERSARIAL_REWARDS:
        names.append("Adv-GRPO")
    return names


def _citation_key(name: str) -> str:
    return "Flow-GRPO" if name == "Flow-GRPO-Fast" else name


def _first_prompt(cfg: dict) -> str:
    from .data import PromptFileError, load_prompts

    for src in (cfg["data"].get("test"), cfg["data"].get("train")):
        if src:
            try:
                return load_prompts(src)[0]["prompt"]
            except (OSError, ValueError, PromptFileError):  # a prompt file absent here: the card still gets one
                continue
    return "a photo of a cat"


def _absent_components(folder: str) -> list[str]:
    """Components a local pipeline folder leaves out on purpose (the shapes models have no T5):
    diffusers wants them passed as None."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return []
    optional = {"feature_extractor", "image_encoder", "safety_checker"}
    return [k for k, v in json.loads(index.read_text()).items()
            if isinstance(v, list) and v[0] is None and k not in optional]


def quick_start(cfg: dict, artifact: Path, *, full_pipeline: bool, lora_subfolder: str | None = None) -> str:
    """Python that loads `artifact` with diffusers and samples one image as the run evaluated."""
    from .models.sd3 import model_defaults

    base = cfg["model"]["path"]
    defaults = model_defaults(str(artifact) if full_pipeline else base)
    size = defaults.get("resolution") or cfg["sample"].get("resolution")
    guidance = cfg["run"].get("eval_guidance") or cfg["sample"]["guidance"]
    # the finer of the run's two samplers: its evaluation's, or its rollouts' when those take more steps
    steps = max(cfg["run"]["eval_steps"], cfg["sample"]["num_steps"])
    kwargs = [f"num_inference_steps={steps}", f"guidance_scale={guidance}"]
    if size:
        kwargs = [f"height={size}", f"width={size}"] + kwargs
    if defaults.get("max_sequence_length"):
        kwargs.append(f"max_sequence_length={defaults['max_sequence_length']}")
    dtype = "torch.float32" if cfg["model"].get("dtype", "float32") == "float32" else "torch.bfloat16"
    from .hf_quiet import diffusers_dtype_key

    key = diffusers_dtype_key()
    lines = ["import torch", "from diffusers import DiffusionPipeline", ""]
    folder = str(artifact) if full_pipeline else base
    absent = "".join(f", {name}=None" for name in _absent_components(folder))
    if full_pipeline:
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({str(artifact)!r}{absent}, {key}={dtype})")
        if lora_subfolder:
            lines.append(f"pipe.load_lora_weights({str(artifact / lora_subfolder)!r})  # the trained strength")
    else:
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({base!r}{absent}, {key}={dtype})")
        if (artifact / "transformer").is_dir():
            lines += ["transformer = type(pipe.transformer).from_pretrained(",
                      f"    {str(artifact / 'transformer')!r}, {key}={dtype})",
                      "pipe.register_modules(transformer=transformer)"]
        else:
            lines.append(f"pipe.load_lora_weights({str(artifact)!r})  # the trained strength: no scale needed")
    if dtype != "torch.float32":
        lines.append('pipe.to("cuda")')
    lines += [f"image = pipe({_first_prompt(cfg)!r}, {', '.join(kwargs)},",
              "             generator=torch.Generator().manual_seed(0)).images[0]",
              "image.save(\"sample.png\")"]
    return "\n".join(lines)


def _results(summary: dict) -> list[str]:
    before, after = summary.get("before"), summary.get("after")
    if not (before and after):
        return ["This run held no held-out evaluation with a verifier; evaluate it with `flowgrpo eval`."]
    unseen = "unseen_bindings"
    tags = sorted((set(before["per_tag"]) | set(after["per_tag"])) - {unseen})
    out = ["Held-out prompts, scored by the shapes verifier (strict accuracy), the same seeds before and after:", "",
           "| tag | before | after |", "| --- | --- | --- |"]
    for t in tags:
        b, a = before["per_tag"].get(t, float("nan")), after["per_tag"].get(t, float("nan"))
        out.append(f"| {t} | {b:.3f} | {a:.3f} |")
    out.append(f"| **overall** | **{before['overall']:.3f}** | **{after['overall']:.3f}** |")
    if unseen in after["per_tag"]:
        out.append(f"| {unseen} (outside the overall) | {before['per_tag'].get(unseen, float('nan')):.3f} | "
                   f"{after['per_tag'][unseen]:.3f} |")
    ch = summary.get("change")
    if ch:
        out += ["", f"Change {ch['overall']:+.3f} (95% CI {ch['ci95'][0]:+.3f} .. {ch['ci95'][1]:+.3f}) overall."]
    return out


def _key_settings(cfg: dict) -> list[str]:
    m, s, o, r = cfg["model"], cfg["sample"], cfg["optim"], cfg["reward"]
    rows = [("model.path", m["path"]), ("optim.policy_loss", o["policy_loss"]),
            ("reward.weights", json.dumps(r["weights"])), ("sample.kind", s["kind"]),
            ("sample.num_steps", s["num_steps"]), ("sample.guidance", s["guidance"]),
            ("sample.group_size x prompts_per_step", f"{s['group_size']} x {s['prompts_per_step']}"),
            ("optim.steps", o["steps"]), ("optim.lr", o["lr"]), ("optim.kl_beta", o["kl_beta"]),
            ("run.seed", cfg["run"]["seed"])]
    if m["lora"]["enabled"]:
        rows.insert(1, ("model.lora rank / alpha", f"{m['lora']['rank']} / {m['lora']['alpha']}"))
    if o["policy_loss"] == "nft":
        rows.append(("optim.nft_kl_weight", o["nft_kl_weight"]))
    if o["policy_loss"] in ("nft", "reward_filtered", "supervised") and o.get("fm_sigma_range"):
        rows.append(("optim.fm_sigma_range", o["fm_sigma_range"]))
    if s.get("window_size"):
        rows.append(("sample.window_size", s["window_size"]))
    return ["| setting | value |", "| --- | --- |"] + [f"| `{k}` | `{v}` |" for k, v in rows]


def render_card(cfg: dict, summary: dict, artifact: Path, *, full_pipeline: bool = False,
                lora_subfolder: str | None = None, images: list[str] = ()) -> str:
    methods = method_names(cfg)
    loss = cfg["optim"]["policy_loss"]
    tags = ["flowgrpo", "text-to-image", "reinforcement-learning", "diffusers"] + [n.lower() for n in methods]
    if cfg["model"]["lora"]["enabled"] and not full_pipeline:
        tags.append("lora")
    base = cfg["model"]["path"]
    # The Hub checks base_model against its model ids: a local folder is named in a comment instead.
    base_line = (f"# base_model: {base} is a local folder; set the Hub id it was published under"
                 if Path(base).exists() else f"base_model: {base}")
    meta = ["---", base_line, "library_name: diffusers", "pipeline_tag: text-to-image", "tags:"] + [f"- {t}" for t in dict.fromkeys(tags)] + [
            "# license: set this to the base model's licence before publishing", "---"]
    what = "a LoRA" if cfg["model"]["lora"]["enabled"] else "a fine-tuned transformer"
    if full_pipeline:
        what = "a diffusers pipeline with " + what + (" beside it" if lora_subfolder else " merged in")
    body = [f"# {' + '.join(methods) or loss} on {Path(cfg['model']['path']).name}", "",
            f"{what[0].upper() + what[1:]} trained with flowgrpo by online reinforcement "
            f"learning on `{cfg['model']['path']}`.", "",
            "## Method", "",
            f"Objective `optim.policy_loss: {loss}`: {OBJECTIVE_TEXT.get(loss, loss)}.",
            f"Rewards (`reward.weights`, mixed by `{cfg['reward'].get('mix', 'reward')}`): "
            + ", ".join(f"`{k}` x {v}" for k, v in cfg["reward"]["weights"].items()) + ".", "",
            "## Recipe", "",
            "The full training config is `config.yaml` beside this card; rerun it with "
            "`flowgrpo train config.yaml`. Key settings:", ""] + _key_settings(cfg) + [
            "", "## Results", ""] + _results(summary)
    if summary.get("wall_seconds"):
        body += ["", f"{summary.get('iterations', cfg['optim']['steps'])} iterations, "
                     f"{summary['wall_seconds']:.0f} s of wall time."]
    for img in images:
        body += ["", f"![{Path(img).stem}]({img})"]
    body += ["", "## Quick start", "", "```python", quick_start(cfg, artifact, full_pipeline=full_pipeline,
                                                                 lora_subfolder=lora_subfolder), "```", ""]
    body += ["Publish the folder as it is: `huggingface-cli upload USER/NAME " + str(artifact) + "`, then load it "
             "by its Hub id instead of the local path.", "", "## Citation", "", "```bibtex"]
    for name in dict.fromkeys(_citation_key(n) for n in methods):
        key, title, arxiv = CITATIONS[name]
        body += [f"@article{{{key},", f"  title={{{title}}},", f"  journal={{arXiv preprint arXiv:{arxiv}}},",
                 "  year={2025}", "}"]
    body.append("```")
    return "\n".join(meta + [""] + body) + "\n"


def write_model_card(artifact: str | Path, cfg: Any, summary: dict | None = None, *, run_dir: str | Path | None = None,
                     full_pipeline: bool = False, lora_subfolder: str | None = None) -> Path:
    """Write `artifact/README.md` and `artifact/config.yaml`, and copy the run's before/after
    evaluation grids into `artifact/images/`. `cfg`: a TrainConfig or its dict."""
    import yaml

    from .config import to_dict

    cfg = cfg if isinstance(cfg, dict) else to_dict(cfg)
    artifact = Path(artifact)
    run_dir = Path(run_dir) if run_dir else Path(cfg["run"]["output_dir"])
    images = []
    for tag in ("before", "after"):
        grid = run_dir / "grids" / f"eval-{tag}.png"
        if grid.is_file():
            (artifact / "images").mkdir(parents=True, exist_ok=True)
            shutil.copy(grid, artifact / "images" / grid.name)
            images.append(f"images/{grid.name}")
    (artifact / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    card = render_card(cfg, summary or {}, artifact, full_pipeline=full_pipeline, lora_subfolder=lora_subfolder,
                       images=images)
    path = artifact / "README.md"
    path.write_text(card)
    return path


def find_run(folder: str | Path) -> Path | None:
    """The run folder above a saved LoRA / model (RUN/lora, RUN/checkpoints/ckpt-N/lora): the first
    parent holding config.yaml and summary.json or metrics.jsonl."""
    for p in [Path(folder), *Path(folder).parents][:4]:
        if (p / "config.yaml").is_file() and ((p / "summary.json").is_file() or (p / "metrics.jsonl").is_file()):
            return p
    return None


def card_for_export(out: Path, trained: str, *, merged: bool) -> Path | None:
    """The card of an exported pipeline, from the run that trained `trained`; None when no run is found."""
    import yaml

    run = find_run(trained)
    if run is None:
        return None
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return write_model_card(out, cfg, summary, run_dir=run, full_pipeline=True,
                            lora_subfolder=None if merged or not cfg["model"]["lora"]["enabled"] else "lora")

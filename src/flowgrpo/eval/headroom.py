"""`flowgrpo headroom`: how much a reward leaves for RL to find, measured before training.

For every prompt, n images are sampled with the deterministic ODE from their own seeds and
scored with any registered reward. From the n outcomes of a prompt:

- **pass@k** (k = 1..n): the chance that at least one of k images drawn from the n passes,
  with the unbiased estimator of Chen et al. (2021), pass@k = 1 - C(n-c, k) / C(n, k), c the
  passing images. pass@1 is the plain pass rate; pass@n says whether any image passed. RL
  with a group of k images mostly turns "sometimes right" (pass@k high, pass@1 low) into
  "usually right".
- **never / always**: the share of prompts with c = 0 (nothing for RL to reinforce: a
  verifier reward gives these groups no signal) and c = n (already solved).
- **group std**: the population std of the reward within a prompt's n images, the spread
  that GRPO's normalisation divides by, averaged over prompts.
- **zero-signal share**: the share of prompt groups whose rewards are all equal, counted by
  the trainer's own `group_advantages`: these groups cost samples and teach nothing.

A sample passes when its value >= threshold (default 1.0: strict success of a 0/1 reward).
The value is the reward's `strict` component when it has one (the shapes rewards: strict
verifier success whatever the training reward), else its score; `pass_on` picks another
component or forces the score. std and zero-signal always use the score, what GRPO sees.

Image j of the prompt at position i of its source (before any tag filter) starts from the
noise seeded by `image_seed(seed, str(i), j)`, the same as `flowgrpo eval generate`: results
do not depend on the batch size, on `--tags` or on `--limit`.

Summaries are given per prompt, per tag (metadata "tag", "" if absent) and overall, both as
the mean over prompts and as the mean over tags (GenEval's convention).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

PASS_AUTO = "auto"  # the "strict" component when the reward has one, else the score
PASS_SCORE = "score"


# ---- pure functions ------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), in the stable
    product form 1 - prod_{i=n-c+1}^{n} (1 - k / i) (Chen et al. 2021)."""
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise TypeError("n, c and k must be integers")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_curve(n: int, c: int) -> list[float]:
    """[pass@1, ..., pass@n]."""
    return [pass_at_k(n, c, k) for k in range(1, n + 1)]


_METRICS = ("pass@1", "never", "always", "group_std", "zero_signal", "mean_reward")


def _mean_row(rows: list[dict], n: int) -> dict:
    """Means of the per-prompt (or per-tag) rows' metrics and pass@k curves."""
    out = {"pass_at_k": [float(np.mean([r["pass_at_k"][k] for r in rows])) for k in range(n)]}
    for m in _METRICS:
        out[m] = float(np.mean([r[m] for r in rows]))
    return out


def aggregate(scores, passed, tags: list[str] | None = None, prompts: list[str] | None = None,
              keys: list | None = None) -> dict:
    """Headroom summary of a (P, n) array of reward scores and a (P, n) array of pass flags.

    Returns {"n", "per_prompt": [...], "per_tag": {tag: {...}}, "overall": {"prompts": {...},
    "tags": {...}}}: "prompts" averages over prompts, "tags" over the tag means.
    """
    from ..algorithms.advantages import group_advantages

    scores = np.asarray(scores, dtype=np.float64)
    passed = np.asarray(passed, dtype=bool)
    if scores.ndim != 2 or scores.shape != passed.shape or scores.size == 0:
        raise ValueError(f"scores and passed must be equal (P, n) arrays, got {scores.shape} and {passed.shape}")
    n_prompts, n = scores.shape
    tags = [""] * n_prompts if tags is None else [t or "" for t in tags]
    if len(tags) != n_prompts:
        raise ValueError(f"{len(tags)} tags for {n_prompts} prompts")
    ids = torch.arange(n_prompts).repeat_interleave(n)
    adv, stats = group_advantages(torch.as_tensor(scores.reshape(-1)), ids, std_mode="group")
    flat = (adv.reshape(n_prompts, n).abs().amax(dim=1) == 0).numpy()  # the trainer's "no signal"
    rows = []
    for i in range(n_prompts):
        c = int(passed[i].sum())
        row = {"index": keys[i] if keys is not None else i, "prompt": prompts[i] if prompts is not None else None,
               "tag": tags[i], "passed": c, "n": n, "pass@1": c / n, "pass_at_k": pass_curve(n, c),
               "never": float(c == 0), "always": float(c == n),
               "group_std": float(np.std(scores[i])), "zero_signal": float(flat[i]),
               "mean_reward": float(np.mean(scores[i])), "scores": [float(s) for s in scores[i]],
               "pass": [int(p) for p in passed[i]]}
        rows.append(row)
    per_tag = {}
    for t in sorted(set(tags)):
        sel = [r for r in rows if r["tag"] == t]
        per_tag[t] = {"prompts": len(sel), "images": len(sel) * n, **_mean_row(sel, n)}
    overall = {"prompts": {"prompts": n_prompts, "images": n_prompts * n, **_mean_row(rows, n)},
               "tags": {"tags": len(per_tag), **_mean_row(list(per_tag.values()), n)}}
    # the trainer's own counters (equal to the means above), so a run's logs can be checked against them
    overall["prompts"]["zero_signal_groups"] = stats.zero_signal_groups
    return {"n": n, "per_prompt": rows, "per_tag": per_tag, "overall": overall}


def format_table(summary: dict) -> str:
    n = summary["n"]
    ks = [1] + ([8] if n > 8 else []) + ([n] if n > 1 else [])
    head = f"{'tag':<16}{'prompts':>8}" + "".join(f"{'pass@' + str(k):>9}" for k in ks)
    head += f"{'never':>8}{'always':>8}{'grp std':>9}{'0-signal':>9}"

    def line(name: str, row: dict, count: int) -> str:
        s = f"{name[:15]:<16}{count:>8d}" + "".join(f"{row['pass_at_k'][k - 1]:>9.3f}" for k in ks)
        return s + f"{row['never']:>8.3f}{row['always']:>8.3f}{row['group_std']:>9.3f}{row['zero_signal']:>9.3f}"

    lines = [head]
    for t, row in summary["per_tag"].items():
        lines.append(line(t or "(no tag)", row, row["prompts"]))
    ov = summary["overall"]
    lines.append(line("mean of prompts", ov["prompts"], ov["prompts"]["prompts"]))
    if len(summary["per_tag"]) > 1:
        lines.append(line("mean of tags", ov["tags"], ov["prompts"]["prompts"]))
    return "\n".join(lines)


def plot(summary: dict, path: str | Path, title: str = "") -> Path:
    """pass@k against k: one line per tag, the overall means in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = summary["n"]
    ks = np.arange(1, n + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if len(summary["per_tag"]) > 1:
        for t, row in summary["per_tag"].items():
            ax.plot(ks, row["pass_at_k"], marker=".", lw=1.2, label=f"{t or '(no tag)'} ({row['prompts']})")
        ax.plot(ks, summary["overall"]["tags"]["pass_at_k"], color="black", lw=2.4, label="mean of tags")
    ax.plot(ks, summary["overall"]["prompts"]["pass_at_k"], color="black", lw=2.4, ls="--",
            label="mean of prompts")
    ax.set_xlabel("k (images per prompt)")
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(1, max(n, 2))
    if n >= 4:
        ax.set_xscale("log", base=2)
        ticks = sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    ax.grid(alpha=0.3)
    ax.set_title(title or "headroom: pass@k")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- sampling and scoring -----------------------------------------------------------------
def seeds_for(seed: int, keys: list, n: int) -> list[int]:
    """Seed of image j of each prompt: `eval generate`'s image_seed(seed, str(key), j)."""
    from .generate import image_seed

    return [image_seed(seed, str(key), j) for key in keys for j in range(n)]


@torch.no_grad()
def sample_batches(policy, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, resolution: int,
                   batch_size: int):
    """Yield (start, uint8 images) for the flat list of (prompt, seed), ODE, batch_size at a time."""
    from ..rewards.base import as_uint8_images
    from ..sampling import initial_noise, rollout

    shape = policy.latent_shape(resolution, resolution)
    # FLUX.1-dev embeds its guidance and has no unconditional branch: no negative prompt then.
    use_cfg = guidance != 1.0 and not getattr(policy, "guidance_embeds", False)
    negative = policy.encode_prompts([""]) if use_cfg else None
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        unique = list(dict.fromkeys(chunk))
        enc = policy.encode_prompts(unique)
        where = torch.tensor([unique.index(p) for p in chunk], device=next(iter(enc.values())).device)
        cond = {k: v.index_select(0, where) for k, v in enc.items()}
        gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        init = initial_noise(shape, len(chunk), gens)
        traj = rollout(policy, cond, negative, num_steps=steps, guidance=guidance, noise_level=0.0, kind="ode",
                       height=resolution, width=resolution, generator=gens, init_latents=init)
        yield start, as_uint8_images(traj.images.float())


def _pass_values(out, pass_on: str, reward_name: str) -> tuple[np.ndarray, str]:
    if pass_on == PASS_AUTO:
        pass_on = "strict" if "strict" in out.components else PASS_SCORE
    if pass_on == PASS_SCORE:
        return np.asarray(out.scores, dtype=np.float64), pass_on
    if pass_on not in out.components:
        from ..cli import UserError

        have = ", ".join(sorted(out.components)) or "none"
        raise UserError(f"reward {reward_name!r} has no component {pass_on!r} (components: {have}); "
                        f"use --pass-on score or one of its components")
    return np.asarray(out.components[pass_on], dtype=np.float64), pass_on


def _check_binary(values: np.ndarray, reward_name: str, pass_on: str) -> None:
    ok = np.isnan(values) | (values == 0.0) | (values == 1.0)
    if not ok.all():
        from ..cli import UserError

        example = float(values[~ok][0])
        raise UserError(f"reward {reward_name!r} ({pass_on}) is not 0/1 (e.g. {example:.4g}), so the default "
                        f"threshold 1.0 means little: pass --threshold T (a sample passes when its value >= T)")


def score_groups(policy, reward, reward_name: str, prompts: list[str], metadata: list[dict], keys: list, *, n: int,
                 steps: int, guidance: float, resolution: int, seed: int = 0, batch_size: int = 64,
                 pass_on: str = PASS_AUTO, threshold: float | None = None, progress: bool = False) -> dict:
    """Sample n images per prompt and score them; whole prompt groups go to the reward together
    (pairwise rewards need them), and images are dropped once scored.

    Returns {"scores": (P, n), "values": (P, n) the values passing is judged on, "passed": (P, n),
    "pass_on", "threshold", "info": summed reward counters}."""
    n_prompts = len(prompts)
    flat_prompts = [p for p in prompts for _ in range(n)]
    seeds = seeds_for(seed, keys, n)
    scores = np.full((n_prompts, n), np.nan)
    values = np.full((n_prompts, n), np.nan)
    info: dict[str, float] = {}
    resolved = pass_on
    buffer: list[np.ndarray] = []
    done_groups = 0  # groups already scored
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(flat_prompts), desc="headroom", unit="img")
    for start, images in sample_batches(policy, flat_prompts, seeds, steps=steps, guidance=guidance,
                                        resolution=resolution, batch_size=batch_size):
        buffer.append(images)
        have = start + len(images)
        complete = have // n
        if complete > done_groups:
            pool = np.concatenate(buffer)
            first = done_groups * n
            take = (complete - done_groups) * n
            imgs, rest = pool[:take], pool[take:]
            g = slice(done_groups, complete)
            group_ids = np.repeat(np.arange(done_groups, complete), n)
            out = reward(imgs, flat_prompts[first:first + take],
                         [metadata[i] for i in range(done_groups, complete) for _ in range(n)], group_ids)
            s = np.asarray(out.scores, dtype=np.float64)
            if s.shape != (take,):
                from ..rewards.base import RewardError

                raise RewardError(f"reward {reward_name!r} returned {s.shape} scores for {take} images")
            v, resolved = _pass_values(out, pass_on, reward_name)
            if threshold is None:
                _check_binary(v, reward_name, resolved)
            scores[g] = s.reshape(-1, n)
            values[g] = v.reshape(-1, n)
            for k, x in out.info.items():
                info[k] = info.get(k, 0.0) + float(x)
            buffer = [rest] if len(rest) else []
            done_groups = complete
        if bar is not None:
            bar.update(len(images))
    if bar is not None:
        bar.close()
    thr = 1.0 if threshold is None else float(threshold)
    with np.errstate(invalid="ignore"):
        passed = values >= thr  # NaN (an image the reward could not score) never passes
    return {"scores": scores, "values": values, "passed": passed, "pass_on": resolved, "threshold": thr,
            "info": info, "unscored": int(np.isnan(scores).sum())}


def _parse_reward_args(pairs: list[str] | None) -> dict:
    from ..cli import UserError

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise UserError(f"--reward-arg {p!r}: use KEY=VALUE (VALUE read as JSON when it parses)")
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def run(args) -> dict:
    """The `headroom` command: returns the written summary (also printed)."""
    from ..cli import UserError
    from ..data import PromptFileError, load_prompts
    from ..models import load_policy
    from ..models.sd3 import check_model_path
    from ..rewards import make_reward
    from .generate import DTYPES, sampling_defaults

    # What can be checked before loading a model is checked first.
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise UserError(f"--threshold must be a finite number, got {args.threshold}")
    kwargs = _parse_reward_args(args.reward_arg)
    reward = make_reward(args.reward, **kwargs)
    if getattr(reward, "kind", "pointwise") == "adversarial":
        print(f"note: {args.reward!r} is adversarial: its untrained discriminator scores these images")
    items = load_prompts(args.prompts)
    keys = list(range(len(items)))
    if args.tags:
        keep = [i for i, it in enumerate(items) if (it["metadata"].get("tag") or "") in args.tags]
        if not keep:
            raise PromptFileError(f"no prompts in {args.prompts!r} have tags {args.tags}")
        items, keys = [items[i] for i in keep], keep
    if args.limit:
        items, keys = items[:args.limit], keys[:args.limit]
    check_model_path(args.model)
    if args.lora and not Path(args.lora).exists():
        raise UserError(f"LoRA folder {args.lora!r} does not exist")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")

    t0 = time.perf_counter()
    from diffusers.utils import logging as dlog

    bars_were_on = dlog.is_progress_bar_enabled()
    if args.quiet:
        dlog.disable_progress_bar()
    try:
        policy = load_policy(args.model, dtype=DTYPES[dtype], device=device)
    finally:
        if bars_were_on:
            dlog.enable_progress_bar()
    if args.lora:
        policy.load_lora(args.lora, scale=args.lora_scale)
    d = sampling_defaults(policy, args.model)
    from ..models.sd3 import model_defaults

    steps = args.steps or int(model_defaults(args.model).get("eval_steps", 20))
    guidance = float(args.guidance if args.guidance is not None else d["guidance"])
    size = int(args.size or d["resolution"])
    res = score_groups(policy, reward, args.reward, [it["prompt"] for it in items],
                       [it["metadata"] for it in items], keys, n=args.n, steps=steps, guidance=guidance,
                       resolution=size, seed=args.seed, batch_size=args.batch_size, pass_on=args.pass_on,
                       threshold=args.threshold, progress=not args.quiet)
    summary = aggregate(res["scores"], res["passed"], [it["metadata"].get("tag") or "" for it in items],
                        [it["prompt"] for it in items], keys)
    wall = time.perf_counter() - t0
    settings = {"model": args.model, "lora": args.lora, "lora_scale": args.lora_scale, "prompts": args.prompts,
                "tags": args.tags, "limit": args.limit, "reward": args.reward, "reward_args": kwargs,
                "pass_on": res["pass_on"], "threshold": res["threshold"],
                "threshold_given": args.threshold is not None, "n": args.n, "steps": steps,
                "guidance": guidance, "resolution": size, "seed": args.seed, "sampler": "ode",
                "dtype": dtype, "device": str(device), "batch_size": args.batch_size,
                "seeds": "image j of the prompt at position i of the source: image_seed(seed, str(i), j)"}
    result = {"settings": settings, "overall": summary["overall"], "per_tag": summary["per_tag"],
              "per_prompt": summary["per_prompt"], "n": summary["n"], "reward_info": res["info"],
              "unscored_images": res["unscored"], "wall_s": round(wall, 2)}
    what = (f"{args.reward} {res['pass_on']} >= {res['threshold']:g}")
    print(f"headroom: {len(items)} prompts x {args.n} images, {steps}-step ODE, guidance {guidance:g}, "
          f"{size}px, pass = {what} ({wall:.1f}s)")
    if res["unscored"]:
        print(f"warning: {res['unscored']} image(s) got no score from the reward (counted as not passing)")
    print(format_table(summary))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "headroom.json").write_text(json.dumps(result, indent=1))
        plot(summary, out / "headroom.png", title=f"{Path(args.model).name}{' + LoRA' if args.lora else ''}: "
                                                   f"{args.prompts}, {what}")
        print(f"wrote {out / 'headroom.json'} and {out / 'headroom.png'}")
    return result


def _command(args) -> int:
    run(args)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("headroom", help="pass@k, never/always-solved and zero-signal shares before training",
                       description="Sample n images per prompt (ODE) and report how much a reward leaves for "
                                   "RL: pass@k for k = 1..n, the share of prompts never and always solved, the "
                                   "within-group reward std and the share of groups GRPO gets no signal from.")
    p.add_argument("--model", required=True, help="diffusers folder or hub id")
    p.add_argument("--lora", default=None, help="a LoRA folder to apply (a trained run's lora/)")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--prompts", required=True, help="shapes:train, shapes:test or a .jsonl/.txt/.csv file")
    p.add_argument("--tags", nargs="*", default=None, help="keep only prompts with these tags (metadata 'tag')")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (after --tags)")
    p.add_argument("--reward", required=True, help="a registered reward, e.g. shapes_strict, or remote:URL")
    p.add_argument("--reward-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="keyword argument of the reward (repeatable; VALUE read as JSON when it parses)")
    p.add_argument("--pass-on", "--pass-component", dest="pass_on", default=PASS_AUTO,
                   help="what passing is judged on: auto (the reward's 'strict' component if it has one, else "
                        "its score), score, or a component name")
    p.add_argument("--threshold", type=float, default=None,
                   help="a sample passes when its value >= this (default 1.0, allowed only for 0/1 values)")
    p.add_argument("--n", type=int, default=16, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the folder's eval_steps, else 20)")
    p.add_argument("--guidance", type=float, default=None, help="default: the model folder's, as eval generate")
    p.add_argument("--size", type=int, default=None, help="pixels (default: the model's resolution)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch (results do not depend on it)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, else fp32), fp32, bf16, fp16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="write DIR/headroom.json and DIR/headroom.png here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_command)

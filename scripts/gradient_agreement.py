"""How much does one iteration's policy gradient agree with another's on the same prompts?

For a training config, fix one set of prompts, draw R independent rollout batches (fresh
noise, same prompts), score them, and compute each batch's GRPO gradient at the current
weights (no optimizer step). The mean pairwise cosine between the R gradients estimates the
gradient's signal-to-noise ratio: near 0, an optimizer step is mostly noise and learning is
slow whatever the learning rate; the higher, the more each step moves the policy the right way.
Use it to choose the sampling settings (window, noise level, reward, group size) before
spending minutes on a run.

    python scripts/gradient_agreement.py configs/demo.yaml --repeats 4 \
        --set sample.noise_level=0.8 --set sample.noise_level=1.2

Each --set is one variant (separate several overrides inside one variant with ";").
Positional overrides apply to every variant. With optim.policy_loss=awm the gradient is
that of the AWM surrogate (the flow-matching loss of the final images).
Four repeats give 6 pairs, too few to tell 0.02 from 0.16 reliably: use 8 for decisions.

--append FILE adds each result, with its config and --label, to a JSON-lines file;
--plot FILE.png draws every line of that file as one bar (docs/figures/gradient_agreement.png):

    python scripts/gradient_agreement.py configs/demo.yaml --repeats 8 --label "NFT, sigma in [0.8, 1]" \
        --append docs/figures/gradient_agreement.jsonl
    python scripts/gradient_agreement.py --plot docs/figures/gradient_agreement.png \
        --append docs/figures/gradient_agreement.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from flowgrpo.config import load_config
from flowgrpo.train_config import TrainConfig
from flowgrpo.trainer import Trainer, derived_generator


def batch_gradient(trainer: Trainer, items: list[dict], seed: int) -> tuple[torch.Tensor, dict]:
    """The GRPO gradient of one rollout batch of `items` (noise from `seed`), flattened."""
    trainer.draw_prompts = lambda iteration: items
    batch = trainer.sample(seed)
    adv, stats = trainer.score(batch)
    steps = trainer.loss_steps(batch, seed)  # what the trainer's update would train on
    trainer.optimizer.zero_grad(set_to_none=True)
    n = len(adv)
    w = torch.ones(n)
    mb = trainer.cfg.optim.train_batch_size
    for t in steps:
        for lo in range(0, n, mb):
            idx = torch.arange(lo, min(n, lo + mb))
            loss, _ = trainer._loss_at(batch, idx, w[idx], t, adv[idx])
            (loss * len(idx) / (n * len(steps))).backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.named_params.values() if p.grad is not None])
    return grad.clone(), stats


def measure(cfg: TrainConfig, repeats: int, prompt_seed: int) -> dict:
    trainer = Trainer(cfg)
    g = derived_generator(prompt_seed, 0, 1)
    idx = torch.randint(len(trainer.train_items), (cfg.sample.prompts_per_step,), generator=g).tolist()
    items = [trainer.train_items[i] for i in idx]
    grads, rewards = [], []
    for r in range(repeats):
        grad, stats = batch_gradient(trainer, items, 10_000 + r)
        grads.append(grad)
        rewards.append(stats)
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]
    mean = torch.stack(grads).mean(0)
    return {
        "cosine_mean": sum(cos) / len(cos),
        "cosine_min": min(cos),
        "grad_norm": float(torch.stack([x.norm() for x in grads]).mean()),
        "mean_grad_norm": float(mean.norm()),
        "reward_group_std": sum(s.get("reward/group_std", 0.0) for s in rewards) / repeats,
        "strict": sum(v for s in rewards for k, v in s.items() if k.endswith("/strict")) / repeats,
    }


def plot(lines: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.9 * len(lines) + 2, 3.6))
    x = range(len(lines))
    ax.bar(x, [r["cosine_mean"] for r in lines], color="C0", alpha=0.7, label="mean pairwise cosine")
    ax.scatter(x, [r["cosine_min"] for r in lines], color="k", marker="_", s=200, label="lowest pair")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(list(x), [f"{r.get('label') or r['variant']}\n({r.get('repeats', '?')} batches)" for r in lines],
                  fontsize=8)
    ax.set_ylabel("cosine between two batches' gradients")
    ax.set_title("gradient agreement at the base, same prompts, fresh noise", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--label", action="append", default=[], help="a name per variant, for --append and --plot")
    ap.add_argument("--append", help="JSON-lines file the results are added to")
    ap.add_argument("--plot", help="draw the --append file's results into this PNG (no measuring without a config)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--prompt-seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="one variant: overrides separated by ';'")
    ap.add_argument("overrides", nargs="*", help="overrides applied to every variant")
    args = ap.parse_intermixed_args()
    variants = args.set or [""]
    if args.config:
        for i, v in enumerate(variants):
            extra = [x for x in v.split(";") if x]
            cfg = load_config(TrainConfig, args.config, list(args.overrides) + extra)
            res = measure(cfg, args.repeats, args.prompt_seed)
            line = {"variant": v or "(config)", **{k: round(x, 5) for k, x in res.items()}}
            print(json.dumps(line), flush=True)
            if args.append:
                line.update(config=args.config, overrides=list(args.overrides) + extra, repeats=args.repeats,
                            label=args.label[i] if i < len(args.label) else None)
                with open(args.append, "a") as f:
                    f.write(json.dumps(line) + "\n")
    if args.plot:
        if not args.append:
            ap.error("--plot draws the results of an --append file")
        with open(args.append) as f:
            plot([json.loads(x) for x in f if x.strip()], args.plot)


if __name__ == "__main__":
    main()

"""How far the model's own samples are from its training data, per sampler.

Forward-process objectives (NFT, AWM, reward-filtered flow matching) train on the sampler's
final latents x0. If those are systematically narrower than the data the model was trained
on, flow matching on them narrows the model further, whatever the reward says. This prints,
for renders of the prompts (through the model's VAE) and for the model's own deterministic
samples with Euler or Heun at several step counts: the latent std, the share of images the
verifier passes (strict) and its partial credit.

    python scripts/sampler_dispersion.py --tags colors --per-prompt 16
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from flowgrpo.models import load_policy
    from flowgrpo.rewards.base import as_uint8_images
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.pretrain import _to_tensor
    from flowgrpo.worlds.shapes.render import render_batch
    from flowgrpo.worlds.shapes.verify import score_batch

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="assets/shapes-sd3")
    ap.add_argument("--lora", default=None)
    ap.add_argument("--tags", nargs="+", default=["colors"])
    ap.add_argument("--split", default="train")
    ap.add_argument("--per-prompt", type=int, default=16)
    ap.add_argument("--samplers", nargs="+", default=["euler:8", "euler:20", "euler:50", "heun:4", "heun:8", "heun:10"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model)
    if args.lora:
        policy.load_lora(args.lora)
    recs = [r for r in split_records()[args.split] if r["tag"] in args.tags] * args.per_prompt
    size = policy.default_resolution()
    vae = policy.pipe.vae
    with torch.no_grad():
        renders = render_batch(recs, 0, size)
        x0 = (vae.encode(_to_tensor(renders)).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        cond = policy.encode_prompts([r["prompt"] for r in recs])
    st, pa = score_batch(renders, recs)
    print(json.dumps({"sampler": "renders", "nfe": 0, "latent_std": round(float(x0.std()), 3),
                      "strict": float(st.mean()), "partial": round(float(pa.mean()), 3)}))
    for spec in args.samplers:
        solver, steps = spec.split(":")
        x = sample(policy, cond, int(steps), solver, size)
        st, pa = score_batch(as_uint8_images(policy.decode(x)), recs)
        nfe = int(steps) if solver == "euler" else 2 * int(steps) - 1
        print(json.dumps({"sampler": spec, "nfe": nfe, "latent_std": round(float(x.std()), 3),
                          "strict": round(float(st.mean()), 3), "partial": round(float(pa.mean()), 3)}), flush=True)


@torch.no_grad()
def sample(policy, cond, steps: int, solver: str, size: int) -> torch.Tensor:
    """Euler or Heun (2nd order; Euler on the last step into sigma = 0), CFG-free, fixed noise."""
    n = next(iter(cond.values())).shape[0]
    x = torch.randn(n, *policy.latent_shape(size, size), generator=torch.Generator().manual_seed(1))
    s = policy.sigmas(steps, size, size)
    for i in range(steps):
        v = policy.velocity(x, s[i], cond, None, 1.0)
        dt = s[i + 1] - s[i]
        if solver == "heun" and s[i + 1] > 0:
            v2 = policy.velocity(x + v * dt, s[i + 1], cond, None, 1.0)
            v = 0.5 * (v + v2)
        elif solver not in ("euler", "heun"):
            raise SystemExit(f"unknown solver {solver!r}: euler or heun")
        x = x + v * dt
    return x


if __name__ == "__main__":
    main()

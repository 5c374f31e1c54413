"""When does a shapes sample commit to its colour or count? Re-noise and re-sample from each step.

    python scripts/decision_time.py --tag colors --n 16

Samples the tag's training prompts with the 20-step ODE (CFG-free). For a step k it takes the
clean prediction x0 = x_k - sigma_k v at that step, noises it again to sigma_k with fresh noise,
finishes with the ODE and checks whether the result passes / shows the same colours as the
original sample. Agreement near chance at step k means the choice was still open there;
agreement near 1 means it had been made. Results: docs/results/objectives.md#where-the-choice-is-made-noise-levels.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    from flowgrpo.models import load_policy
    from flowgrpo.rewards.base import as_uint8_images
    from flowgrpo.sampling import rollout
    from flowgrpo.worlds.shapes.grammar import split_records
    from flowgrpo.worlds.shapes.verify import detect, score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/shapes-sd3-alt")
    ap.add_argument("--tag", default="colors")
    ap.add_argument("--n", type=int, default=16, help="images per prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--at", type=int, nargs="*", default=[1, 2, 3, 4, 6, 8, 10, 14])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model)
    records = [r for r in split_records()["train"] if r["tag"] == args.tag]
    prompts = [r["prompt"] for r in records for _ in range(args.n)]
    cond = policy.encode_prompts(prompts)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(len(prompts), *policy.latent_shape(32, 32), generator=gen)
    sigmas = policy.sigmas(args.steps, 32, 32)

    def finish(x: torch.Tensor, start: int) -> torch.Tensor:
        for i in range(start, args.steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * policy.velocity(x, sigmas[i], cond, None, 1.0)
        return x

    def judge(latents: torch.Tensor) -> list[tuple[float, tuple[str, ...]]]:
        out = []
        for j, img in enumerate(as_uint8_images(policy.decode(latents))):
            dets = detect(img)
            out.append((score(img, records[j // args.n], dets).strict, tuple(sorted(d.color for d in dets))))
        return out

    with torch.no_grad():
        states = rollout(policy, cond, None, num_steps=args.steps, guidance=1.0, noise_level=0.0, kind="ode",
                         height=32, width=32, generator=gen, init_latents=x, decode=False).latents.unbind(1)
        original = judge(states[-1])
        p = float(np.mean([o[0] for o in original]))
        print(f"{args.tag}: {len(prompts)} samples, strict {p:.3f} (agreement by chance {p * p + (1 - p) ** 2:.3f})")
        print("step  sigma  strict  same pass/fail  same colours")
        for k in args.at:
            v = policy.velocity(states[k], sigmas[k], cond, None, 1.0)
            x0 = states[k] - sigmas[k] * v
            again = judge(finish((1 - sigmas[k]) * x0 + sigmas[k] * torch.randn(x0.shape, generator=gen), k))
            same = np.mean([a[0] == o[0] for a, o in zip(again, original)])
            colours = np.mean([a[1] == o[1] for a, o in zip(again, original)])
            print(f"{k:>4}  {float(sigmas[k]):.3f}  {np.mean([a[0] for a in again]):.3f}   {same:.3f}           {colours:.3f}")


if __name__ == "__main__":
    main()

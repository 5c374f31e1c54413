"""Per-iteration cost of flowgrpo's Flow-GRPO against the reference implementation's code path
(yifan123/flow_grpo), at identical settings on the same model folder.

The settings are `configs/shapes_flowgrpo.yaml`'s, Flow-GRPO's defaults: P prompts x K images an
iteration, 10 SDE steps (noise level 0.7) at CFG 4.5, the first 9 steps trained with CFG, the
clipped ratio (clip 1e-4) plus KL 0.04 to the base (the LoRA switched off), LoRA r 16 / alpha 32
(gaussian) on the attention projections, AdamW 3e-4, gradient norm clipped at 1.0, one optimizer
step an iteration, the shapes_partial reward with per-prompt mean and std. Text embeddings are
computed once per prompt for both (outside the timings).

flowgrpo: the Trainer's sample / score / update. Reference: the checkout's own
`pipeline_with_logprob` and `sde_step_with_logprob` (flow_grpo/diffusers_patch) and its
`PerPromptStatTracker`, imported from the checkout given with --official, and its training step
(scripts/train_sd3.py: per timestep a CFG forward of the concatenated batch with the
unconditional half detached, the SDE step's log-prob, the same with the adapter disabled for
the KL term, the loss, backward) re-created here as the script runs it. Nothing of the checkout
is copied into flowgrpo; without --official only flowgrpo is timed.

    git clone https://github.com/yifan123/flow_grpo /tmp/flow_grpo   # any checkout
    python scripts/bench_flowgrpo_official.py --official /tmp/flow_grpo

Prints one row per side (CPU seconds an iteration: sampling, reward, update, total) as Markdown
(docs/performance.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from side_by_side import LORA_TARGETS, bench_main, clock, frozen_sd3, trainer_side  # noqa: E402

GUIDANCE, NOISE_LEVEL, STEPS, TRAINED, CLIP, BETA = 4.5, 0.7, 10, 9, 1e-4, 0.04


def flowgrpo_side(args):
    """Yields the number of trained parameters, then (sampling, reward, update) seconds of each iteration."""
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig

    over = [f"model.path={args.model}", f"sample.group_size={args.group}", f"sample.prompts_per_step={args.prompts}",
            f"sample.batch_size={args.batch}", f"optim.train_batch_size={args.batch}", "data.test=",
            "run.eval_before=false", "run.tensorboard=false", f"run.threads={args.threads}"]
    yield from trainer_side(load_config(TrainConfig, str(ROOT / "configs" / "shapes_flowgrpo.yaml"), over), args.iterations)


def official_side(args):
    """The reference loop's work per iteration with the reference's own functions; yields as flowgrpo_side."""
    sys.path.insert(0, str(Path(args.official).resolve()))
    from flow_grpo.diffusers_patch.sd3_pipeline_with_logprob import pipeline_with_logprob  # the checkout's
    from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob
    from flow_grpo.stat_tracking import PerPromptStatTracker
    from peft import LoraConfig, get_peft_model

    from flowgrpo.data import load_prompts
    from flowgrpo.rewards import as_uint8_images, make_reward

    encoder, pipe = frozen_sd3(args.model)
    model = get_peft_model(pipe.transformer, LoraConfig(r=16, lora_alpha=32, init_lora_weights="gaussian",
                                                        target_modules=LORA_TARGETS))
    pipe.transformer = model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    reward = make_reward("shapes_partial")
    items = load_prompts("shapes:train")
    res = encoder.default_resolution()
    with torch.no_grad():
        neg = encoder.encode_prompts([""])
    gen = torch.Generator().manual_seed(0)
    yield sum(p.numel() for p in params)

    def log_prob_at(sample, j, embeds, pooled):
        """scripts/train_sd3.py's compute_log_prob with train.cfg: one forward of the doubled batch."""
        out = model(hidden_states=torch.cat([sample["latents"][:, j]] * 2),
                    timestep=torch.cat([sample["timesteps"][:, j]] * 2), encoder_hidden_states=embeds,
                    pooled_projections=pooled, return_dict=False)[0]
        uncond, text = out.chunk(2)
        uncond = uncond.detach()
        v = uncond + GUIDANCE * (text - uncond)
        return sde_step_with_logprob(pipe.scheduler, v.float(), sample["timesteps"][:, j],
                                     sample["latents"][:, j].float(), prev_sample=sample["next_latents"][:, j].float(),
                                     noise_level=NOISE_LEVEL)

    for it in range(args.iterations + 1):
        picks = torch.randint(len(items), (args.prompts,), generator=gen).tolist()
        prompts = [items[i]["prompt"] for i in picks for _ in range(args.group)]
        meta = [items[i]["metadata"] for i in picks for _ in range(args.group)]
        with torch.no_grad():
            enc = encoder.encode_prompts(prompts)
        emb, pooled = enc["prompt_embeds"], enc["pooled_projections"]
        t0 = clock()
        model.eval()
        samples, images = [], []
        for lo in range(0, len(prompts), args.batch):
            n = len(prompts[lo:lo + args.batch])
            imgs, latents, log_probs = pipeline_with_logprob(
                pipe, prompt_embeds=emb[lo:lo + n], pooled_prompt_embeds=pooled[lo:lo + n],
                negative_prompt_embeds=neg["prompt_embeds"].expand(n, -1, -1),
                negative_pooled_prompt_embeds=neg["pooled_projections"].expand(n, -1),
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt", height=res, width=res,
                noise_level=NOISE_LEVEL)
            latents = torch.stack(latents, dim=1)
            samples.append({"latents": latents[:, :-1], "next_latents": latents[:, 1:],
                            "log_probs": torch.stack(log_probs, dim=1),
                            "timesteps": pipe.scheduler.timesteps.repeat(n, 1),
                            "prompt_embeds": emb[lo:lo + n], "pooled_prompt_embeds": pooled[lo:lo + n]})
            images.append(imgs)
        samples = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
        t1 = clock()
        rewards = reward(as_uint8_images(torch.cat(images)), prompts, meta, None).scores
        adv = torch.as_tensor(PerPromptStatTracker(global_std=False).update(prompts, rewards), dtype=torch.float32)
        samples["advantages"] = adv[:, None].repeat(1, STEPS)
        t2 = clock()
        model.train()
        perm = torch.randperm(len(prompts))
        samples = {k: v[perm] for k, v in samples.items()}
        micro = list(range(0, len(prompts), args.batch))
        for lo in micro:
            sample = {k: v[lo:lo + args.batch] for k, v in samples.items()}
            n = len(sample["latents"])
            embeds = torch.cat([neg["prompt_embeds"].expand(n, -1, -1), sample["prompt_embeds"]])
            pooled_embeds = torch.cat([neg["pooled_projections"].expand(n, -1), sample["pooled_prompt_embeds"]])
            for j in range(TRAINED):
                _, log_prob, mean, std = log_prob_at(sample, j, embeds, pooled_embeds)
                with torch.no_grad(), model.disable_adapter():
                    _, _, mean_ref, _ = log_prob_at(sample, j, embeds, pooled_embeds)
                a = sample["advantages"][:, j].clamp(-5, 5)
                ratio = torch.exp(log_prob - sample["log_probs"][:, j])
                policy_loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP, 1 + CLIP)).mean()
                kl = (((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std ** 2)).mean()
                ((policy_loss + BETA * kl) / (len(micro) * TRAINED)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        t3 = clock()
        yield t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    bench_main(__doc__, flowgrpo_side, official_side, checkout="yifan123/flow_grpo", official_name="reference",
               default_batch=64)

if __name__ == "__main__":
    main()

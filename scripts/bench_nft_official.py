"""Per-iteration cost of flowgrpo's DiffusionNFT against the official DiffusionNFT code path, at
identical settings on the same model folder.

Both sides: the same SD3 folder, LoRA r 32 / alpha 64 (gaussian) on the attention projections,
P prompts x K images an iteration, 10 dpm2 steps at guidance 1.0 sampled by the old weights, the
shapes_partial reward, per-prompt mean / global-std advantages, a random 9 of the 10 steps per
image, beta 1, KL 1e-4 to the base, one optimizer step, EMA 0.9, decay type 1, micro-batches of B.
Text embeddings are computed once per prompt for both (outside the timings).

flowgrpo: the Trainer's sample / score / update. Official: NVlabs/DiffusionNFT's own functions
imported from a checkout given with --official (`pipeline_with_logprob` with its dpm2 `solver.py`,
`PerPromptStatTracker`, `EMAModuleWrapper`, `return_decay`'s schedule via the same constants),
and its training step (scripts/train_nft_sd3.py: per micro-batch and timestep an "old" adapter
forward, a "default" forward, an adapter-off reference forward, the loss, backward) re-created
here with peft's two adapters, as the script runs it. Nothing of the checkout is copied into
flowgrpo; without --official only flowgrpo is timed.

    git clone https://github.com/NVlabs/DiffusionNFT /tmp/DiffusionNFT   # any checkout
    python scripts/bench_nft_official.py --official /tmp/DiffusionNFT --model assets/shapes-sd3

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



def flowgrpo_side(args):
    """Yields the number of trained parameters, then (sampling, reward, update) seconds of each iteration."""
    from flowgrpo.config import load_config
    from flowgrpo.train_config import TrainConfig

    over = [f"model.path={args.model}", "model.lora.rank=32", "model.lora.alpha=64", "model.lora.init=gaussian",
            "sample.kind=dpm2", "sample.num_steps=10", "sample.guidance=1.0", f"sample.group_size={args.group}",
            f"sample.prompts_per_step={args.prompts}", f"sample.batch_size={args.batch}",
            "reward.weights={shapes_partial: 1.0}", "optim.policy_loss=nft", "optim.nft_beta=1.0",
            "optim.nft_kl_weight=1e-4", "optim.nft_decay_type=1", "optim.adv_std=global",
            "optim.drop_zero_signal=false", "optim.timestep_mode=random", "optim.timestep_subset=per_sample",
            "optim.timestep_fraction=0.99", f"optim.train_batch_size={args.batch}", "optim.optimizer_steps=1",
            "optim.ema_decay=0.9", "optim.ema_every=1", "optim.ema_warmup=true", "data.test=",
            "run.eval_before=false", "run.tensorboard=false", f"run.threads={args.threads}"]
    yield from trainer_side(load_config(TrainConfig, None, over), args.iterations)


def official_side(args):
    """The official loop's work per iteration, with the official functions where they exist; yields
    as flowgrpo_side."""
    sys.path.insert(0, str(Path(args.official).resolve()))
    from flow_grpo.diffusers_patch.pipeline_with_logprob import pipeline_with_logprob  # the checkout's
    from flow_grpo.ema import EMAModuleWrapper
    from flow_grpo.stat_tracking import PerPromptStatTracker
    from peft import LoraConfig, get_peft_model

    from flowgrpo.data import load_prompts
    from flowgrpo.rewards import as_uint8_images, make_reward

    encoder, pipe = frozen_sd3(args.model)
    lora = LoraConfig(r=32, lora_alpha=64, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    model = get_peft_model(pipe.transformer, lora)
    model.add_adapter("old", lora)
    model.set_adapter("default")
    params = [p for p in model.parameters() if p.requires_grad]
    model.set_adapter("old")
    old_params = [p for p in model.parameters() if p.requires_grad]
    model.set_adapter("default")
    with torch.no_grad():
        for src, dst in zip(params, old_params):
            dst.copy_(src)
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    ema = EMAModuleWrapper(params, decay=0.9, update_step_interval=1)
    reward = make_reward("shapes_partial")
    items = load_prompts("shapes:train")
    res = encoder.default_resolution()
    n_train = int(10 * 0.99)
    gen = torch.Generator().manual_seed(0)
    global_step = 0
    yield sum(p.numel() for p in params)
    for it in range(args.iterations + 1):
        picks = torch.randint(len(items), (args.prompts,), generator=gen).tolist()
        prompts = [items[i]["prompt"] for i in picks for _ in range(args.group)]
        meta = [items[i]["metadata"] for i in picks for _ in range(args.group)]
        with torch.no_grad():
            enc = encoder.encode_prompts(prompts)
        emb, pooled = enc["prompt_embeds"], enc["pooled_projections"]
        t0 = clock()
        model.eval()
        lat_clean, images, timesteps = [], [], None
        for lo in range(0, len(prompts), args.batch):
            model.set_adapter("old")
            with torch.no_grad():
                imgs, latents, _ = pipeline_with_logprob(
                    pipe, prompt_embeds=emb[lo:lo + args.batch], pooled_prompt_embeds=pooled[lo:lo + args.batch],
                    num_inference_steps=10, guidance_scale=1.0, output_type="pt", height=res, width=res,
                    deterministic=True, solver="dpm2", model_type="sd3")
            model.set_adapter("default")
            lat_clean.append(latents[-1])
            images.append(imgs)
            timesteps = pipe.scheduler.timesteps.clone()
        x0_all = torch.cat(lat_clean)
        t1 = clock()
        rewards = reward(as_uint8_images(torch.cat(images)), prompts, meta, None).scores
        adv = torch.as_tensor(PerPromptStatTracker(global_std=True).update(prompts, rewards), dtype=torch.float32)
        t2 = clock()
        model.train()
        n = len(prompts)
        perms = torch.stack([torch.randperm(len(timesteps)) for _ in range(n)])
        micro = list(range(0, n, args.batch))
        for lo in micro:
            sl = slice(lo, lo + args.batch)
            x0, a, e, p = x0_all[sl], adv[sl], emb[sl], pooled[sl]
            for j in range(n_train):
                ts = timesteps[perms[sl, j]]
                t = (ts / 1000.0).view(-1, 1, 1, 1)
                xt = (1 - t) * x0 + t * torch.randn_like(x0)
                model.set_adapter("old")
                with torch.no_grad():
                    v_old = model(hidden_states=xt, timestep=ts, encoder_hidden_states=e, pooled_projections=p,
                                  return_dict=False)[0]
                model.set_adapter("default")
                v = model(hidden_states=xt, timestep=ts, encoder_hidden_states=e, pooled_projections=p,
                          return_dict=False)[0]
                with torch.no_grad(), model.disable_adapter():
                    v_ref = model(hidden_states=xt, timestep=ts, encoder_hidden_states=e, pooled_projections=p,
                                  return_dict=False)[0]
                model.set_adapter("default")
                r = (a.clamp(-5, 5) / 5 / 2 + 0.5).clamp(0, 1)
                x0_pos, x0_neg = xt - t * v, xt - t * (2 * v_old - v)  # beta 1
                with torch.no_grad():
                    w_pos = (x0_pos.double() - x0.double()).abs().mean(dim=(1, 2, 3), keepdim=True).clip(min=1e-5)
                    w_neg = (x0_neg.double() - x0.double()).abs().mean(dim=(1, 2, 3), keepdim=True).clip(min=1e-5)
                pos = ((x0_pos - x0) ** 2 / w_pos).mean(dim=(1, 2, 3))
                neg = ((x0_neg - x0) ** 2 / w_neg).mean(dim=(1, 2, 3))
                loss = (5.0 * (r * pos + (1 - r) * neg)).mean() + 1e-4 * ((v - v_ref) ** 2).mean()
                (loss / (len(micro) * n_train)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        global_step += 1
        ema.step(params, global_step)
        decay = min(0.001 * global_step, 0.5)  # decay type 1
        with torch.no_grad():
            for src, dst in zip(params, old_params):
                dst.copy_(dst * decay + src.detach() * (1.0 - decay))
        t3 = clock()
        yield t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    bench_main(__doc__, flowgrpo_side, official_side, checkout="NVlabs/DiffusionNFT", official_name="official",
               default_batch=16)

if __name__ == "__main__":
    main()

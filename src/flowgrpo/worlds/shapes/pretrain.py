"""Pretrain the shapes base model: the VAE, then the MMDiT with its text encoders.

Rectified flow: x_t = (1 - t) x_0 + t eps, the transformer predicts v = eps - x_0, t drawn
logit-normal (SD3's choice). Data are rendered on the fly from the train split, tags drawn
uniformly so the rare tags (counting, position) get as many scenes as colour bindings.
Checkpoints are atomic and a run resumes where it stopped, bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .grammar import split_records
from .model import (SHAPES_T5_TOKENS, ShapesArchitecture, build_scheduler, build_text_encoder,
                    build_transformer, build_vae, write_word_tokenizer)
from .render import render_batch


@dataclass
class PretrainConfig:
    out: str = "models/shapes-sd3"  # the diffusers folder written at the end
    work_dir: str = "runs/pretrain"  # checkpoints and logs
    seed: int = 0  # scenes, initial weights and noise all derive from it
    threads: int = 2  # torch CPU threads
    arch: ShapesArchitecture = field(default_factory=ShapesArchitecture)  # model sizes (the arch.* keys)
    vae_steps: int = 600  # enough for a non-downsampling VAE to be near-lossless on flat shapes
    vae_batch: int = 32  # rendered scenes per VAE step
    vae_lr: float = 2e-3  # AdamW, cosine to 10%; a small convolutional VAE tolerates a large rate
    vae_kl_weight: float = 1e-6  # tiny: latents only need to be smooth, not Gaussian
    dit_steps: int = 8000  # transformer (and text encoder) steps; the cosine follows this length
    dit_batch: int = 64  # scenes per step, drawn tag-balanced from the train split and rendered on the fly
    dit_lr: float = 6e-4  # AdamW peak, cosine to 10% after the warm-up
    dit_warmup: int = 300  # linear warm-up steps of the transformer rate
    weight_decay: float = 0.0  # none: a short run on unlimited rendered data does not overfit
    ema_decay: float = 0.999  # the shipped weights are the EMA: sharper samples for a short run
    caption_dropout: float = 0.1  # empty prompt so classifier-free guidance works
    checkpoint_every: int = 500  # steps between resumable checkpoints in work_dir
    log_every: int = 100  # steps between loss lines
    eval_every: int = 1000  # steps between quick verifier evaluations on the test split
    eval_images_per_prompt: int = 2  # images a prompt in those quick evaluations
    eval_guidance: float = 4.5  # CFG of the quick evaluations (the pretrained model needs guidance)
    # Warm start from a saved pipeline folder (e.g. the shipped assets/shapes-sd3) instead of
    # random weights: continue pretraining from a shipped folder without the run's checkpoint.
    init_from: Optional[str] = None
    # Least pixels between objects in the rendered scenes. 2 made the shipped base; wider gaps
    # leave the model room to keep neighbours apart (docs/shapes-world.md#render-options).
    render_gap: int = 2
    render_cells: bool = False  # one object per quarter of the canvas in multi-object scenes
    # position scenes on the middle row or column, each object in the half its relation names: the
    # relation then fixes the layout (docs/results/all-tags.md#position-a-layout-the-relation-fixes)
    render_centred_relations: bool = False
    # False keeps the text encoders as loaded (a continuation that changes only how the model
    # draws, so students and earlier assets keep sharing the teacher's encoders).
    train_text_encoders: bool = True
    # {tag: weight} for the transformer's scenes (default weight 1 each; empty: every tag alike), e.g.
    # more scenes of a tag the model draws badly
    tag_weights: dict[str, float] = field(default_factory=dict)
    # t = sigmoid(N(mean, std)): SD3's logit-normal at (0, 1) gives noise levels above 0.8 only 8% of the
    # steps, yet a layout (where each object goes) is chosen there; a positive mean trains the layout more
    t_logit_mean: float = 0.0  # (1.0: 35% of the steps above sigma 0.8)
    t_logit_std: float = 1.0  # SD3's; wider spreads the steps toward both ends


def _tag_balanced_prompts(rng: np.random.Generator, n: int, records: list[dict],
                          tag_weights: dict[str, float] | None = None) -> list[dict]:
    """n records: a tag drawn (uniformly, or in proportion to `tag_weights`, default weight 1), then one of its prompts."""
    by_tag: dict[str, list[dict]] = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(r)
    tags = sorted(by_tag)
    if tag_weights:
        unknown = sorted(set(tag_weights) - set(tags))
        p = np.array([float(tag_weights.get(t, 1.0)) for t in tags])
        if unknown or any(w < 0 for w in tag_weights.values()) or not p.sum() > 0:
            raise ValueError(f"tag_weights {dict(tag_weights)}: weights must be >= 0, not all 0, and tags among {tags}"
                             + (f" (unknown: {unknown})" if unknown else ""))
        drawn = rng.choice(len(tags), size=n, p=p / p.sum())
    else:
        drawn = rng.integers(len(tags), size=n)
    return [by_tag[tags[i]][rng.integers(len(by_tag[tags[i]]))] for i in drawn]


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def encode_text(tokenizers, encoders, prompts: list[str], t5_tokens: int, joint_dim: int):
    """SD3's prompt encoding (penultimate CLIP layers side by side, pooled projections
    concatenated, T5 slot zeros), differentiable so the text encoders can train."""
    hiddens, pooled = [], []
    for tok, enc in zip(tokenizers, encoders):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        pooled.append(out[0])
        hiddens.append(out.hidden_states[-2])
    clip = torch.cat(hiddens, -1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    t5 = torch.zeros(clip.shape[0], t5_tokens, joint_dim, dtype=clip.dtype)
    return torch.cat([clip, t5], 1), torch.cat(pooled, -1)


def _atomic_dir_swap(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(ckpt: Path, modules: dict, opt, gen: torch.Generator, rng: np.random.Generator,
                    step: int) -> None:
    """Atomically write the modules (file name -> module), the optimizer, both RNGs and the step."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    save_file({"torch_generator": gen.get_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "numpy_rng": rng.bit_generator.state}))
    _atomic_dir_swap(tmp, ckpt)


def load_checkpoint(ckpt: Path, modules: dict, opt, gen: torch.Generator, rng: np.random.Generator) -> int:
    """Restore what save_checkpoint wrote; the step to continue from (0 when there is no checkpoint)."""
    if not (ckpt / "state.json").exists():
        return 0
    state = json.loads((ckpt / "state.json").read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(ckpt / f"{name}.safetensors"))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    rng.bit_generator.state = state["numpy_rng"]
    gen.set_state(load_file(ckpt / "rng.safetensors")["torch_generator"])
    return state["step"]


def train_vae(cfg: PretrainConfig, log) -> "torch.nn.Module":
    arch, work = cfg.arch, Path(cfg.work_dir)
    vae_dir = work / "vae"
    if cfg.init_from:
        vae_dir = Path(cfg.init_from) / "vae"
    if (vae_dir / "config.json").exists():
        from diffusers import AutoencoderKL
        log(f"vae: reusing {vae_dir}")
        return AutoencoderKL.from_pretrained(vae_dir)
    torch.manual_seed(cfg.seed)
    vae = build_vae(arch)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps)
    rng = np.random.default_rng(cfg.seed + 1)
    train = split_records()["train"]
    t0 = time.time()
    for step in range(cfg.vae_steps):
        x = _to_tensor(render_batch(_tag_balanced_prompts(rng, cfg.vae_batch, train), int(rng.integers(2**31)), arch.image_size))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    # SD3-style latent normalisation: the transformer sees (z - shift) * scale ~ unit variance.
    with torch.no_grad():
        x = _to_tensor(render_batch(_tag_balanced_prompts(rng, 512, train), 12345, arch.image_size))
        z = vae.encode(x).latent_dist.mode()
        vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    tmp = work / "vae.tmp"
    vae.save_pretrained(tmp)
    _atomic_dir_swap(tmp, vae_dir)
    return vae


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then a cosine to 10% over the run: most of the learning happens at full rate."""
    if step < warmup:
        return (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    return warmup_cosine(step, cfg.dit_warmup, cfg.dit_steps)


def open_log(work: Path):
    """A log function that prints and appends to work/log.txt."""
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    return log


def pretrain(cfg: PretrainConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir)
    log = open_log(work)
    arch = cfg.arch
    vae = train_vae(cfg, log).eval().requires_grad_(False)
    tok = write_word_tokenizer(work / "tokenizer", arch.max_text_tokens)
    tokenizers = [tok, tok]
    encoders = [build_text_encoder(arch, tok, cfg.seed + 10), build_text_encoder(arch, tok, cfg.seed + 11)]
    torch.manual_seed(cfg.seed + 2)
    transformer = build_transformer(arch)
    if cfg.init_from:
        src = Path(cfg.init_from)
        transformer.load_state_dict(load_file(src / "transformer" / "diffusion_pytorch_model.safetensors"))
        for i, e in enumerate(encoders):
            missing, unexpected = e.load_state_dict(
                load_file(src / ("text_encoder" if i == 0 else "text_encoder_2") / "model.safetensors"), strict=False)
            if unexpected or any("position_ids" not in k for k in missing):
                raise ValueError(f"{src}: text encoder {i} does not match the architecture ({missing} {unexpected})")
        log(f"initialised from {src}")
    ema = build_transformer(arch)
    ema.load_state_dict(transformer.state_dict())
    ema.requires_grad_(False)
    if not cfg.train_text_encoders:
        for e in encoders:
            e.eval().requires_grad_(False)
    params = list(transformer.parameters()) + [p for e in encoders for p in e.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    rng = np.random.default_rng(cfg.seed + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    ckpt = work / "checkpoint"
    saved = {"transformer": transformer, "ema": ema, **{f"text_encoder_{i}": e for i, e in enumerate(encoders)}}
    start = load_checkpoint(ckpt, saved, opt, gen, rng)
    if start:
        log(f"resumed at step {start}")
    train = split_records()["train"]
    joint_dim = transformer.config.joint_attention_dim
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    t0, losses = time.time(), []
    for step in range(start, cfg.dit_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.dit_lr * _lr_factor(step, cfg)
        recs = _tag_balanced_prompts(rng, cfg.dit_batch, train, cfg.tag_weights)
        images = render_batch(recs, int(rng.integers(2**31)), arch.image_size, cfg.render_gap, cfg.render_cells,
                              cfg.render_centred_relations)
        prompts = [r["prompt"] if rng.random() >= cfg.caption_dropout else "" for r in recs]
        with torch.no_grad():
            x0 = (vae.encode(_to_tensor(images)).latent_dist.mode() - shift) * scale
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(cfg.t_logit_mean + cfg.t_logit_std * torch.randn(x0.shape[0], generator=gen))
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        emb, pooled = encode_text(tokenizers, encoders, prompts, SHAPES_T5_TOKENS, joint_dim)
        pred = transformer(hidden_states=xt, encoder_hidden_states=emb, pooled_projections=pooled,
                           timestep=t * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        losses.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0:
            rate = (time.time() - t0) / len(losses)
            log(f"dit step {done} loss {np.mean(losses[-cfg.log_every:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{rate:.2f}s/step eta {rate * (cfg.dit_steps - done) / 60:.0f}min")
        if done % cfg.checkpoint_every == 0 or done == cfg.dit_steps:
            save_checkpoint(ckpt, saved, opt, gen, rng, done)
            export_pipeline(cfg, work / "snapshot", ema, encoders, tokenizers, vae)
        if cfg.eval_every and done % cfg.eval_every == 0:
            log(quick_eval(work / "snapshot", cfg))
    out = export_pipeline(cfg, Path(cfg.out), ema, encoders, tokenizers, vae)
    log(f"wrote {out}")
    return out


def export_pipeline(cfg, out: Path, transformer, encoders, tokenizers, vae) -> Path:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=build_scheduler(), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=None, tokenizer_3=None,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    # flowgrpo reads these; plain diffusers users pass max_sequence_length themselves
    (tmp / "flowgrpo_defaults.json").write_text(json.dumps(
        {"max_sequence_length": SHAPES_T5_TOKENS, "resolution": cfg.arch.image_size, "guidance": cfg.eval_guidance}))
    _atomic_dir_swap(tmp, out)
    return out


def quick_eval(folder: Path, cfg: PretrainConfig) -> str:
    """Per-tag strict accuracy of a snapshot on the test split (diffusers pipeline, ODE)."""
    from diffusers import StableDiffusion3Pipeline

    from .verify import score_batch

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    test = split_records()["test"]
    recs = [r for r in test for _ in range(cfg.eval_images_per_prompt)]
    with torch.no_grad():
        images = pipe([r["prompt"] for r in recs], num_inference_steps=20, guidance_scale=cfg.eval_guidance,
                      max_sequence_length=SHAPES_T5_TOKENS, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    strict, _ = score_batch((images * 255).round().astype(np.uint8), recs)
    per_tag: dict[str, list[float]] = {}
    for r, s in zip(recs, strict):
        per_tag.setdefault(r["tag"], []).append(s)
    table = {t: round(float(np.mean(v)), 3) for t, v in sorted(per_tag.items())}
    overall = float(np.mean(list(table.values())))
    return f"eval overall {overall:.3f} " + json.dumps(table)


if __name__ == "__main__":  # pragma: no cover - use `flowgrpo pretrain`
    import sys

    from ...config import load_config

    pretrain(load_config(PretrainConfig, sys.argv[1] or None, sys.argv[2:]))

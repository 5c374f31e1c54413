"""Make an RL-ready shapes base: guidance-distil the pretrained model, with alt-text caption noise.

Why. The pretrained model draws recognisable shapes only with classifier-free guidance;
CFG-free its multi-object samples are blobs, and RL on blobs teaches blur. Real bases draw
cleanly and fail on *choices* (a wrong colour, a wrong count), which is what online RL fixes.
This fine-tune gives the shapes world such a base:

* **Guidance distillation.** The student's CFG-free velocity is regressed on the frozen
  teacher's guided velocity ``v_u + w (v_c - v_u)`` (as guidance-distilled models such as
  FLUX.1-dev are made), so one CFG-free pass draws as cleanly as the teacher at guidance w.
* **Alt-text noise.** Web captions state attributes wrongly at some rate. Each training
  caption has its colour words replaced by another colour with probability `color_noise` and
  its count word by another count with probability `count_noise`; the scene (and the
  teacher's conditioning) follows the corrupted caption while the student reads the true one.
  The student therefore learns p(image | caption) as a mixture: it draws what a prompt asks
  most of the time and a clean but wrong choice otherwise, a systematic deficiency that the
  verifier sees and RL can remove. Replacement colours never form a held-out binding, so
  the test split's unseen bindings stay unseen in the student's captions and the teacher's.

Only the transformer trains (the text encoders and the VAE are the teacher's, frozen), so
prompt embeddings are computed once. Checkpoints are atomic and a run resumes bit for bit.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .grammar import COLORS, HELD_OUT_BINDINGS, NUMBERS, make_prompt, split_records
from .pretrain import (_atomic_dir_swap, _tag_balanced_prompts, _to_tensor, encode_text, load_checkpoint, open_log,
                       save_checkpoint, warmup_cosine)
from .render import render_batch


@dataclass
class DistillConfig:
    teacher: str = "assets/shapes-sd3"  # the pretrained pipeline folder (also the student's init)
    out: str = "assets/shapes-sd3-alt"  # the distilled pipeline folder written at the end
    work_dir: str = "runs/distill"  # checkpoints and log
    seed: int = 0  # scenes, caption noise and flow noise all derive from it
    threads: int = 2  # torch CPU threads
    steps: int = 1500  # student steps; the cosine follows this length
    batch: int = 64  # rendered scenes per step
    lr: float = 2.0e-4  # a fine-tune of a converged model, below pretraining's 6e-4
    warmup: int = 100  # linear warm-up steps, then cosine to 10%
    guidance: float = 4.5  # the teacher guidance baked into the student's CFG-free velocity
    color_noise: float = 0.5  # probability a caption's colour word names another colour
    count_noise: float = 0.4  # probability a counting caption's number is another number
    caption_dropout: float = 0.1  # empty captions learn the teacher's unconditional velocity
    ema_decay: float = 0.995  # the written weights are the EMA (a short run: faster decay than pretraining)
    checkpoint_every: int = 250  # steps between resumable checkpoints in work_dir
    log_every: int = 50  # steps between loss lines
    stop_after: int = 0  # end this invocation at this step (0: run to `steps`); resume later with the same config
    # A refinement stage: start the student from another folder's transformer instead of the teacher's,
    # and take the teacher's guided velocity as the target only for noise levels inside guided_interval;
    # outside it the target is the corrupted scene's own flow (noise - x0). Guidance at the highest noise
    # levels is what leaves some noises drawing nothing (docs/results/shapes-bases.md).
    student_init: str | None = None  # a pipeline folder whose transformer initialises student and EMA
    guided_interval: tuple[float, float] = (0.0, 1.0)  # (0, 1): the teacher everywhere, plain distillation
    t_range: tuple[float, float] = (0.0, 1.0)  # noise levels are drawn uniformly in [lo, hi] (probes of one range)
    render_gap: int = 2  # least pixels between rendered objects; match the teacher's pretraining scenes
    render_cells: bool = False  # one object per quarter of the canvas; match the teacher's scenes
    render_centred_relations: bool = False  # position pairs on the middle row or column; match the teacher's scenes


def corrupt_record(record: dict, rng: np.random.Generator, color_noise: float, count_noise: float) -> dict:
    """The scene a noisy alt-text caption of `record` would describe (a grammar record)."""
    held = set(HELD_OUT_BINDINGS)
    include = copy.deepcopy(record["include"])
    for clause in include:
        if "color" in clause and rng.random() < color_noise:
            options = [c for c in COLORS if c != clause["color"] and (c, clause["class"]) not in held]
            others = {c.get("color") for c in include if c is not clause}
            options = [c for c in options if c not in others] or options
            clause["color"] = options[int(rng.integers(len(options)))]
    out = {"tag": record["tag"], "include": include}
    if record["tag"] == "counting" and rng.random() < count_noise:
        n = include[0]["count"]
        include[0]["count"] = int(rng.choice([k for k in NUMBERS if k != n]))
        out["exclude"] = [{"class": include[0]["class"], "count": include[0]["count"] + 1}]
    elif "exclude" in record:
        out["exclude"] = copy.deepcopy(record["exclude"])
    out["prompt"] = make_prompt(out)
    return out


def distillation_target(v_u: torch.Tensor, v_c: torch.Tensor, w: torch.Tensor, scene_flow: torch.Tensor,
                        t: torch.Tensor, guided_interval: tuple[float, float]) -> torch.Tensor:
    """The teacher's guided velocity v_u + w (v_c - v_u) where t lies in the interval, else the scene's flow.

    The scenes follow the corrupted captions, so outside the interval the target is the noisy-caption
    data's own flow (noise - x0): its choices keep their planted rates and carry no teacher error.
    """
    lo, hi = guided_interval
    guided = ((t >= lo) & (t <= hi)).view(-1, *([1] * (v_u.dim() - 1)))
    return torch.where(guided, v_u + w * (v_c - v_u), scene_flow)


def distill(cfg: DistillConfig) -> Path:
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir)
    log = open_log(work)

    teacher_dir = Path(cfg.teacher)
    if not (teacher_dir / "model_index.json").exists():
        raise FileNotFoundError(f"teacher {teacher_dir} is not a diffusers pipeline folder; "
                                "pass teacher=<folder> (e.g. assets/shapes-sd3)")
    pipe = StableDiffusion3Pipeline.from_pretrained(teacher_dir, text_encoder_3=None, tokenizer_3=None)
    teacher = pipe.transformer.eval().requires_grad_(False)
    init = teacher
    if cfg.student_init:
        if not (Path(cfg.student_init) / "transformer").is_dir():
            raise FileNotFoundError(f"student_init {cfg.student_init} has no transformer/ folder; "
                                    "pass a diffusers pipeline folder (e.g. assets/shapes-sd3-alt)")
        init = type(teacher).from_pretrained(Path(cfg.student_init) / "transformer").eval()
    g_lo, g_hi = (float(x) for x in cfg.guided_interval)
    if not 0.0 <= g_lo <= g_hi <= 1.0:
        raise ValueError(f"guided_interval must satisfy 0 <= lo <= hi <= 1, got {list(cfg.guided_interval)}")
    t_lo, t_hi = (float(x) for x in cfg.t_range)
    if not 0.0 <= t_lo < t_hi <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1, got {list(cfg.t_range)}")
    student = copy.deepcopy(init).train().requires_grad_(True)
    ema = copy.deepcopy(init).requires_grad_(False)
    vae = pipe.vae.eval().requires_grad_(False)
    tokenizers, encoders = [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]
    for e in encoders:
        e.eval().requires_grad_(False)
    t5_tokens = json.loads((teacher_dir / "flowgrpo_defaults.json").read_text())["max_sequence_length"] \
        if (teacher_dir / "flowgrpo_defaults.json").exists() else 1
    joint_dim = teacher.config.joint_attention_dim
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def embed(prompts: list[str]):
        for p in prompts:
            if p not in cache:  # one prompt at a time: the same bits whatever the batch (exact resume)
                with torch.no_grad():
                    emb, pooled = encode_text(tokenizers, encoders, [p], t5_tokens, joint_dim)
                cache[p] = (emb[0], pooled[0])
        return torch.stack([cache[p][0] for p in prompts]), torch.stack([cache[p][1] for p in prompts])

    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ckpt, saved = work / "checkpoint", {"student": student, "ema": ema}
    start = load_checkpoint(ckpt, saved, opt, gen, rng)
    if start:
        log(f"resumed at step {start}")
    train = split_records()["train"]
    t0, losses, done = time.time(), [], start
    for step in range(start, min(cfg.steps, cfg.stop_after or cfg.steps)):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.warmup, cfg.steps)
        recs = _tag_balanced_prompts(rng, cfg.batch, train)
        scenes = [corrupt_record(r, rng, cfg.color_noise, cfg.count_noise) for r in recs]
        images = render_batch(scenes, int(rng.integers(2**31)), vae.config.sample_size, cfg.render_gap, cfg.render_cells,
                              cfg.render_centred_relations)
        drop = rng.random(len(recs)) < cfg.caption_dropout
        captions = ["" if d else r["prompt"] for r, d in zip(recs, drop)]
        teacher_captions = ["" if d else s["prompt"] for s, d in zip(scenes, drop)]
        with torch.no_grad():
            x0 = (vae.encode(_to_tensor(images)).latent_dist.mode() - shift) * scale
            noise = torch.randn(x0.shape, generator=gen)
            # uniform; the default [0, 1] covers every level a sampler visits
            t = (t_lo + (t_hi - t_lo) * torch.rand(x0.shape[0], generator=gen)).clamp(1e-3, 1.0)
            xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
            emb_c, pooled_c = embed(teacher_captions)
            emb_u, pooled_u = embed([""] * len(recs))
            v = teacher(hidden_states=torch.cat([xt, xt]), encoder_hidden_states=torch.cat([emb_u, emb_c]),
                        pooled_projections=torch.cat([pooled_u, pooled_c]), timestep=torch.cat([t, t]) * 1000).sample
            v_u, v_c = v.chunk(2)
            w = torch.where(torch.from_numpy(drop).view(-1, 1, 1, 1), 1.0, cfg.guidance)
            target = distillation_target(v_u, v_c, w, noise - x0, t, (g_lo, g_hi))
        emb_s, pooled_s = embed(captions)
        pred = student(hidden_states=xt, encoder_hidden_states=emb_s, pooled_projections=pooled_s,
                       timestep=t * 1000).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), student.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        losses.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0:
            rate = (time.time() - t0) / len(losses)
            log(f"distill step {done} loss {np.mean(losses[-cfg.log_every:]):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {rate:.2f}s/step eta {rate * (cfg.steps - done) / 60:.0f}min")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt, saved, opt, gen, rng, done)
            write_pipeline(pipe, ema, work / "snapshot", cfg)
    if start >= cfg.steps or done >= cfg.steps:
        out = write_pipeline(pipe, ema, Path(cfg.out), cfg)
        log(f"wrote {out}")
        return out
    log(f"stopped at step {done} of {cfg.steps}; run again to resume")
    return work / "snapshot"


def write_pipeline(pipe, transformer, out: Path, cfg: DistillConfig) -> Path:
    """The teacher's folder with the distilled transformer; CFG-free is its default."""
    from diffusers import StableDiffusion3Pipeline

    student_pipe = StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student_pipe.save_pretrained(tmp)
    defaults = json.loads((Path(cfg.teacher) / "flowgrpo_defaults.json").read_text()) \
        if (Path(cfg.teacher) / "flowgrpo_defaults.json").exists() else {}
    defaults["guidance"] = 1.0  # the teacher's guidance is baked in
    (tmp / "flowgrpo_defaults.json").write_text(json.dumps(defaults))
    (tmp / "distillation.json").write_text(json.dumps(
        {k: getattr(cfg, k) for k in ("teacher", "steps", "guidance", "color_noise", "count_noise", "seed",
                                      "student_init", "guided_interval", "t_range", "render_gap",
                                      "render_cells", "render_centred_relations")}, indent=1, default=list))
    _atomic_dir_swap(tmp, out)
    return out

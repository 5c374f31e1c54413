"""The GRPO trainer: sample -> reward -> advantages -> update, top to bottom.

One iteration:
  1. draw `prompts_per_step` prompts (the same on every process), repeat each K times and
     give every process its contiguous slice (so a group may span processes);
  2. roll out with the SDE (or only inside a Fast window), keeping latents and log-probs;
  3. score with the configured rewards; gather scores from all processes;
  4. group-normalise into advantages on the gathered vector (identical everywhere);
  5. take the configured objective's steps (optim.policy_loss: algorithms/objectives/, e.g. the
     clipped ratio of recomputed log-probs of the stored transitions).
Randomness is derived from (seed, iteration, image index), never from a running generator,
so a resumed run draws exactly what an uninterrupted one would. The trainer knows no
model, reward or objective by name: they come from the config through registries.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .algorithms import EMA, group_advantages, mix_advantages
from .algorithms.objectives import CHECKPOINT_NAME, Services, derived_generator, objective_class
from .data import TagDraw, load_prompts
from .eval.held_out import is_shapes
from .models import index_condition, load_policy
from .models.sd3 import LoraSpec
from .monitors import MONITOR_NAME, base_distance
from .parallel import gathered, set_gradient_sync
from .rewards import as_uint8_images, make_reward
from .rewards.pipeline import RewardPipeline, RewardRound
from .sampling import Window, initial_noise, rollout, window_start
from .schedules import cpu_marks, lr_factor, main_process_value
from .train_config import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Batch:
    """One process's share of an iteration's rollouts."""

    prompts: list[str]
    metadata: list[dict]
    global_index: torch.Tensor  # position of each image in the iteration's global batch
    group_ids: torch.Tensor  # prompt group of each image (global numbering)
    cond: dict
    latents: torch.Tensor
    log_probs: torch.Tensor
    images: np.ndarray
    sigmas: torch.Tensor
    sde_steps: torch.Tensor
    rewards: dict[str, np.ndarray] = field(default_factory=dict)
    all_advantages: torch.Tensor | None = None  # the gathered batch's advantages (set by score)
    all_group_ids: torch.Tensor | None = None  # and its group ids
    means: torch.Tensor | None = None  # each step's Gaussian mean, when the objective keeps them
    reward_round: RewardRound | None = None  # the rewards' calls on this batch, running or queued


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator=None):
        from accelerate import Accelerator

        self.cfg = cfg
        objective_cls = objective_class(cfg.optim.policy_loss)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.acc = accelerator or Accelerator()
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        s = cfg.sample
        self.global_batch = s.group_size * s.prompts_per_step
        if self.global_batch % self.world:
            raise ValueError(f"group_size * prompts_per_step = {self.global_batch} must divide evenly over "
                             f"{self.world} processes")
        m = cfg.model
        self.policy = load_policy(m.path, m.backend, DTYPES[m.dtype], self.acc.device,
                                  max_sequence_length=m.max_sequence_length, shift=m.shift,
                                  embedding_cache=m.embedding_cache)
        if m.lora.enabled:
            torch.manual_seed(cfg.run.seed)  # LoRA A is drawn at random: make it a function of the seed
            self.policy.add_lora(LoraSpec(m.lora.rank, m.lora.alpha, m.lora.init, list(m.lora.targets)))
        else:
            self.policy.enable_full_finetune(keep_reference=objective_cls.needs_reference(cfg))
        self.has_reference = m.lora.enabled or objective_cls.needs_reference(cfg)  # policy.reference() works
        if m.gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        # Trained weights are kept in float32 even when the model runs in half precision.
        for p in self.policy.trainable_parameters():
            p.data = p.data.float()
        self.sharded = cfg.parallel.strategy == "fsdp2"
        if self.sharded:  # parallel.py: every block one FSDP2 unit; parameters become shards
            self.policy.shard(cpu_offload=cfg.parallel.cpu_offload,
                              reshard_after_forward=cfg.parallel.reshard_after_forward)
        self.named_params = {n: p for n, p in self.policy.transformer.named_parameters() if p.requires_grad}
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(list(self.named_params.values()), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        if self.sharded:
            self.optimizer = self.acc.prepare(self.optimizer)
        else:
            wrapped, self.optimizer = self.acc.prepare(self.policy.transformer, self.optimizer)
            self.policy.forward_module = wrapped
        self.ema = (EMA(list(self.named_params.values()), o.ema_decay, o.ema_every, warmup=o.ema_warmup)
                    if o.ema_decay > 0 else None)
        self.rewards = {name: make_reward(name, **dict(cfg.reward.args.get(name, {})))
                        for name in cfg.reward.weights}
        self.reward_pipeline = RewardPipeline(self.rewards, overlap=cfg.reward.overlap)
        self.train_items = load_prompts(cfg.data.train, list(cfg.data.train_tags))
        self.test_items = load_prompts(cfg.data.test, list(cfg.data.test_tags)) if cfg.data.test else []
        self.tag_draw = TagDraw(self.train_items, dict(cfg.data.tag_weights))  # for data.balance_tags
        self.resolution = s.resolution or self.policy.default_resolution()
        self.negative = self.policy.encode_prompts([""]) if s.guidance != 1.0 else None
        self._cond_cache: dict[str, dict] = {}
        # rewards judging held-out prompts the shapes verifier cannot (made once, refused early if unusable)
        self.held_out_rewards = self.eval_rewards() if self.test_items and not is_shapes(self.test_items) else None
        self.objective = objective_cls(cfg, self.policy, Services(
            list(self.named_params.values()), self.velocity, cfg.run.seed, self.resolution, self.train_items,
            inference=self.inference))
        self.step = 0

    # ---- 1-2: prompts and rollouts ------------------------------------------------------
    def draw_prompts(self, iteration: int) -> list[dict]:
        g = derived_generator(self.cfg.run.seed, iteration, 1)
        n = self.cfg.sample.prompts_per_step
        if self.cfg.data.balance_tags:
            return self.tag_draw(n, g)
        idx = torch.randint(len(self.train_items), (n,), generator=g)
        return [self.train_items[i] for i in idx.tolist()]

    def draw_window(self, iteration: int) -> Window | None:
        s = self.cfg.sample
        if not s.window_size:
            return None
        lo, hi = s.window_start_range
        start = window_start(iteration, lo, hi, s.window_schedule, s.window_every, s.window_stride,
                             derived_generator(self.cfg.run.seed, iteration, 2))
        return Window(start, s.window_size, s.window_after, s.window_compress)

    def encode(self, prompts: list[str]) -> dict:
        for p in dict.fromkeys(prompts):
            if p not in self._cond_cache:
                # each prompt alone: text encoders' kernels vary with the batch size in the last bits, and
                # which prompts are cached (so batched together) differs after a resume
                enc = self.policy.encode_prompts([p])
                # kept on the CPU: a FLUX condition is 4 MB a prompt, a prompt set of thousands would fill the GPU
                self._cond_cache[p] = {k: v[0].cpu() for k, v in enc.items()}
        return {k: torch.stack([self._cond_cache[p][k] for p in prompts]).to(self.acc.device)
                for k in self._cond_cache[prompts[0]]}

    def sample(self, iteration: int) -> Batch:
        s, seed = self.cfg.sample, self.cfg.run.seed
        items = self.draw_prompts(iteration)
        per_proc = self.global_batch // self.world
        lo = self.rank * per_proc
        gidx = torch.arange(lo, lo + per_proc)
        group_ids = gidx // s.group_size
        prompts = [items[g]["prompt"] for g in group_ids.tolist()]
        metadata = [items[g]["metadata"] for g in group_ids.tolist()]
        window = self.draw_window(iteration)
        shape = self.policy.latent_shape(self.resolution, self.resolution)
        lat, lps, imgs, means = [], [], [], []
        keep_means = self.objective.keeps_step_means
        cond = self.encode(prompts)
        rewards = self.reward_pipeline.begin(gidx.numpy(), group_ids.numpy(), s.group_size)
        with self.objective.sampling_context(), self.inference():  # e.g. NFT samples with its old weights
            for start in range(0, per_proc, s.batch_size):
                sl = slice(start, min(per_proc, start + s.batch_size))
                ids = gidx[sl].tolist()
                # initial noise per image (or per group) and step noise per image, from their seeds
                init_gens = [derived_generator(seed, iteration, 3, (i // s.group_size if s.same_noise_per_group else i))
                             for i in ids]
                init = initial_noise(shape, len(ids), init_gens)
                traj = rollout(self.policy, index_condition(cond, sl), self.negative, num_steps=s.num_steps,
                               guidance=s.guidance, noise_level=s.noise_level, kind=s.kind, height=self.resolution,
                               width=self.resolution, generator=[derived_generator(seed, iteration, 4, i) for i in ids],
                               window=window, init_latents=init, cps_logprob=s.cps_logprob,
                               judged=s.judged_image, keep_means=keep_means)
                lat.append(traj.latents)
                means.append(traj.means)
                lps.append(traj.log_probs)
                imgs.append(as_uint8_images(traj.images))
                rewards.add(sl, imgs[-1], prompts[sl], metadata[sl])  # scored while the next batch samples
        return Batch(prompts, metadata, gidx, group_ids, cond, torch.cat(lat), torch.cat(lps), np.concatenate(imgs),
                     traj.sigmas, traj.sde_steps, means=torch.cat(means) if keep_means else None, reward_round=rewards)

    # ---- 3-4: rewards and advantages ----------------------------------------------------
    def score(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Rewards for this process's images -> advantages for them, plus metrics."""
        stats: dict[str, float] = {}
        global_rewards: dict[str, torch.Tensor] = {}
        all_ids = self.acc.gather(batch.group_ids.to(self.acc.device)).cpu()
        if batch.reward_round is None:  # a batch built by hand: its rewards were never sent
            batch.reward_round = self.reward_pipeline.begin(batch.global_index.numpy(), batch.group_ids.numpy(),
                                                            self.cfg.sample.group_size)
            batch.reward_round.add(slice(None), batch.images, batch.prompts, batch.metadata)
        # waits only for the calls still running; groups straddling processes are judged on the main one
        scored = batch.reward_round.collect(self.acc)
        stats["time/reward_wait"] = batch.reward_round.wait_seconds
        stats["time/reward_compute"] = batch.reward_round.compute_seconds
        batch.reward_round = None  # its images and futures are not needed any more
        for name, out in scored.items():
            scores = out.scores
            for comp, vals in out.components.items():
                stats[f"reward/{name}/{comp}"] = float(vals.mean())
            for k, v in out.info.items():
                stats[f"reward/{name}/{k}"] = float(v)
            global_rewards[name] = scores
            stats[f"reward/{name}/mean"] = float(scores.mean())
            stats[f"reward/{name}/std"] = float(scores.std(unbiased=False))
        o, w = self.cfg.optim, self.cfg.reward.weights
        kw = dict(std_mode=o.adv_std, eps=o.adv_eps, clip=o.adv_clip, ddof=o.adv_std_ddof,
                  batch_renorm=o.adv_batch_renorm)
        total = sum(w[n] * r for n, r in global_rewards.items())
        stats["reward/mean"], stats["reward/std"] = float(total.mean()), float(total.std(unbiased=False))
        if self.cfg.reward.mix == "advantage":
            adv, per = mix_advantages({n: (r, w[n]) for n, r in global_rewards.items()}, all_ids,
                                      clip_after_mix=o.adv_clip_after_mix, **kw)
            zero = float(np.mean([s.zero_signal_share for s in per.values()]))
            # a group carries no signal only if every component is flat in it
            flat = torch.stack([adv[all_ids == g].abs().max() == 0 for g in torch.unique(all_ids)])
            stats["adv/zero_signal_share"] = float(flat.float().mean())
            stats["adv/component_zero_share"] = zero
            for n, st in per.items():  # the summed reward is never normalised: amplification is per reward
                if st.reward_std > 0:
                    stats[f"adv/{n}/amplification"] = st.advantage_std / st.reward_std
        else:
            adv, st = group_advantages(total, all_ids, **kw)
            stats["adv/zero_signal_share"] = st.zero_signal_share
            stats["reward/group_std"] = st.reward_std
        stats["adv/std"] = float(adv.std(unbiased=False))
        stats["adv/abs_mean"] = float(adv.abs().mean())
        if stats.get("reward/group_std", 0) > 0:
            # Pref-GRPO's "illusory advantage": how much normalisation amplifies reward gaps
            stats["adv/amplification"] = stats["adv/std"] / stats["reward/group_std"]
        per_proc = self.global_batch // self.world
        mine = adv[self.rank * per_proc:(self.rank + 1) * per_proc]
        batch.all_advantages, batch.all_group_ids = adv.float(), all_ids
        if self.cfg.run.dump_advantages:
            import json

            path = Path(self.cfg.run.output_dir) / f"advantages-rank{self.rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({"iteration": self.step, "global_index": batch.global_index.tolist(),
                                    "group_ids": batch.group_ids.tolist(), "advantages": mine.tolist(),
                                    "rewards": {n: r.tolist() for n, r in global_rewards.items()}}) + "\n")
        return mine.float(), stats

    # ---- 5: the update --------------------------------------------------------------------
    def update(self, batch: Batch, advantages: torch.Tensor, iteration: int) -> dict:
        o, objective = self.cfg.optim, self.objective
        for group in self.optimizer.param_groups:  # a function of the iteration alone: resume needs no state
            group["lr"] = o.lr * lr_factor(o, iteration)
        keep = torch.ones(len(advantages), dtype=torch.bool)
        if o.drop_zero_signal and objective.uses_advantages:
            for g in torch.unique(batch.group_ids):
                m = batch.group_ids == g
                # decided on the gathered advantages: a group is flat on every process or on none
                if advantages[m].abs().max() == 0:
                    keep[m] = False
        kept = torch.nonzero(keep).flatten()
        counts = self.acc.gather(torch.tensor([len(kept)], device=self.acc.device)).cpu()
        n_mb = max(1, math.ceil(int(counts.max()) / o.train_batch_size))
        # Every process runs the same number of backward passes (DDP, FSDP2), padding with weight 0;
        # micro-batches no larger than needed, so a process with fewer samples computes no more rows
        mb_size = min(o.train_batch_size, max(1, math.ceil(int(counts.max()) / n_mb)))
        order = kept.tolist() + [0] * (n_mb * mb_size - len(kept))
        weights = torch.tensor([1.0] * len(kept) + [0.0] * (len(order) - len(kept)))
        steps = self.loss_steps(batch, iteration)
        chunks = np.array_split(np.arange(n_mb), min(o.optimizer_steps, n_mb))
        agg: dict[str, list[float]] = {"policy_loss": [], "kl": [], "clip_fraction": [], "approx_kl": []}
        first_dev = 0.0
        model = self.policy.forward_module
        model.train()
        for epoch in range(o.inner_epochs):
            for ci, chunk in enumerate(chunks):
                for j, mb in enumerate(chunk):
                    idx = torch.tensor(order[mb * mb_size:(mb + 1) * mb_size])
                    w = weights[mb * mb_size:(mb + 1) * mb_size]
                    last = j == len(chunk) - 1
                    for k, t in enumerate(steps):
                        # gradients are reduced across processes only at the last backward before a step
                        sync = last and k == len(steps) - 1
                        set_gradient_sync(model, sync)  # FSDP2; DDP's no_sync below
                        with (self.acc.no_sync(model) if not sync else contextlib.nullcontext()):
                            loss, st = objective.loss(batch, idx, w, t, advantages[idx])
                            self.acc.backward(loss / (len(steps) * len(chunk)))
                        if epoch == 0 and ci == 0:
                            first_dev = max(first_dev, st.max_ratio_dev)
                        for key in agg:
                            agg[key].append(getattr(st, key))
                if o.max_grad_norm > 0:
                    self.acc.clip_grad_norm_(list(self.named_params.values()), o.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                objective.after_optimizer_step()
        set_gradient_sync(model, True)
        model.eval()
        if self.ema is not None:
            self.ema.update(iteration + 1)
        # every process ran as many microbatches: the mean of their means is the whole batch's mean
        names = [k for k, v in agg.items() if v]
        local = torch.tensor([float(np.mean(agg[k])) for k in names] + [first_dev], dtype=torch.float64)
        everyone = self.acc.gather(local.to(self.acc.device)[None]).cpu().reshape(self.world, -1)
        out = {f"train/{k}": float(everyone[:, i].mean()) for i, k in enumerate(names)}
        out.update({f"train/{k}": v for k, v in objective.after_iteration(iteration).items()})
        out["train/max_ratio_dev_first"] = float(everyone[:, -1].max())
        out["train/kept_share"] = float(counts.sum()) / self.global_batch
        out["train/timesteps"] = len(steps)
        return out

    def loss_steps(self, batch: Batch, iteration: int) -> list:
        """What the objective's loss iterates over this iteration (it prepares its draws)."""
        return self.objective.prepare(batch, iteration)

    def _loss_at(self, batch: Batch, idx, weights, t, adv):
        return self.objective.loss(batch, idx, weights, t, adv)

    def velocity(self, x: torch.Tensor, sigma, cond: dict, reference: bool = False,
                 guidance: float | None = None) -> torch.Tensor:
        """The velocity the loss trains: CFG at `guidance`, else optim.train_guidance, else
        sample.guidance (the sampler's); `reference`: the frozen model."""
        o = self.cfg.optim
        g = guidance if guidance is not None else (o.train_guidance if o.train_guidance is not None
                                                   else self.cfg.sample.guidance)
        if g != 1.0 and self.negative is None:  # rollouts without CFG, a loss with it
            self.negative = self.policy.encode_prompts([""])
        neg = None
        if self.negative is not None:  # the unconditional embedding broadcast to the batch
            neg = {k: v.expand(len(x), *v.shape[1:]) for k, v in self.negative.items()}
        with self.policy.reference() if reference else contextlib.nullcontext():
            return self.policy.velocity(x, sigma, cond, neg, g, uncond_grad=o.cfg_uncond_grad)

    def inference(self):
        """The context of gradient-free forwards of the trained weights: with model.fold_lora the
        LoRA folded into them (entered after any swap of weights, so it folds the swapped ones)."""
        if self.cfg.model.fold_lora and self.cfg.model.lora.enabled:
            return self.policy.folded_adapters()
        return torch.no_grad()

    # ---- evaluation and saving -------------------------------------------------------------
    @contextlib.contextmanager
    def evaluation_weights(self):
        """The weights that are evaluated and saved (EMA's when it is on), run through the bare
        module: a DDP wrapper's forward would wait for the other processes' gradients."""
        ctx = self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()
        active = self.policy.forward_module
        self.policy.forward_module = self.policy.transformer
        try:
            with ctx:
                yield
        finally:
            self.policy.forward_module = active

    def eval_rewards(self) -> dict:
        """{name: (reward, weight)} judging held-out prompts the shapes verifier cannot
        (run.eval_rewards, else the training rewards)."""
        from .config import ConfigError

        weights = dict(self.cfg.run.eval_rewards) or dict(self.cfg.reward.weights)
        args = self.cfg.reward.args
        rewards = {name: (self.rewards.get(name) or make_reward(name, **dict(args.get(name, {}))), w)
                   for name, w in weights.items()}
        relative = [name for name, (r, _) in rewards.items() if r.needs_groups]
        if relative:
            raise ConfigError(f"held-out evaluation cannot use {', '.join(relative)}: a group-relative reward (win "
                              f"rates average 0.5 in every group) measures no progress; set run.eval_rewards to "
                              f"pointwise rewards, e.g. run.eval_rewards={{clip: 1.0}}")
        return rewards

    def save_final(self, folder: Path) -> Path | None:
        """The trained weights (EMA's when on) in diffusers' format: gathered whole once from the
        shards under FSDP2 (every process must call this), written by the main process."""
        with self.evaluation_weights():
            state = gathered(self.policy.trained_state(), keep=self.acc.is_main_process) if self.sharded else None
            if self.acc.is_main_process:
                return self.policy.save_trained(folder, state)
        return None

    # ---- adversarial rewards ---------------------------------------------------------------
    def update_discriminators(self, batch: Batch) -> dict:
        """Train rewards that learn (Adv-GRPO): every process gets all images, so the
        discriminators stay identical without syncing their weights."""
        from accelerate.utils import gather_object

        stats = {}
        adversarial = {n: r for n, r in self.rewards.items() if r.kind == "adversarial"}
        if not adversarial:
            return stats
        imgs = np.concatenate(gather_object([batch.images])) if self.world > 1 else batch.images
        prompts = sum(gather_object([batch.prompts]), []) if self.world > 1 else batch.prompts
        meta = sum(gather_object([batch.metadata]), []) if self.world > 1 else batch.metadata
        for name, reward in adversarial.items():
            for k, v in reward.update(imgs, prompts, meta).items():
                stats[f"disc/{name}/{k}"] = float(v)
        return stats

    def phase(self, iteration: int) -> tuple[bool, bool]:
        """(update generator, update discriminators) for this iteration."""
        r = self.cfg.reward
        has_adv = any(rw.kind == "adversarial" for rw in self.rewards.values())
        if not has_adv:
            return True, False
        if r.d_period <= 0:
            return True, True
        d_phase = iteration % r.d_period < r.d_steps
        return (not d_phase), d_phase


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


# ---- the loop ------------------------------------------------------------------------------
def evaluate(trainer: Trainer, tag: str) -> dict:
    """Held-out evaluation (EMA weights when EMA is on), split over every process
    (eval/held_out.py); every process must call it, every process gets the table."""
    from .eval.held_out import evaluate_held_out, images_per_tag
    from .runlog import image_grid

    cfg, acc = trainer.cfg, trainer.acc
    if not trainer.test_items:
        return {}
    per = (images_per_tag(trainer.test_items, cfg.run.eval_images_per_tag) if cfg.run.eval_images_per_tag > 0
           else cfg.run.eval_images_per_prompt)
    with trainer.evaluation_weights(), trainer.inference():
        result = evaluate_held_out(
            trainer.policy, trainer.test_items, images_per_prompt=per,
            steps=cfg.run.eval_steps, guidance=cfg.run.eval_guidance or cfg.sample.guidance,
            resolution=trainer.resolution, seed=cfg.run.seed + 777, batch_size=cfg.run.eval_batch_size,
            rewards=trainer.held_out_rewards, accelerator=acc, solver=cfg.run.eval_solver)
    if acc.is_main_process:
        out = Path(cfg.run.output_dir) / "grids"
        out.mkdir(parents=True, exist_ok=True)
        shown = min(len(g) for g in result.grid_images)  # a row a prompt: as many as the fewest have
        image_grid(np.concatenate([g[:shown] for g in result.grid_images]), shown, result.grid_prompts,
                   scale=3).save(out / f"eval-{tag}.png")
    return result.table


def eval_stats(table: dict) -> dict[str, float]:
    """The logged scalars of one held-out evaluation: accuracy (or reward) per tag, each reward's
    mean when rewards judged it, and the image statistics against the renderer's
    (eval/image/size, ..._ref) when the evaluation has them."""
    return {"eval/overall": table["overall"], **{f"eval/{k}": v for k, v in table["per_tag"].items()},
            **{f"eval/reward/{k}": v for k, v in table.get("per_reward", {}).items()},
            **{f"eval/image/{k}": v for k, v in table.get("image_stats", {}).items()}}


def train(cfg: TrainConfig, resume: str | bool | None = None, max_iterations: int | None = None) -> dict:
    """Run GRPO. `resume`: True = latest checkpoint in output_dir, or a checkpoint path."""
    import json

    from tqdm import tqdm

    from .checkpoint import CheckpointReader, latest_checkpoint, load_checkpoint
    from .config import save_config, to_dict
    from .model_card import write_model_card
    from .monitors import HackingMonitor
    from .runlog import MetricsLogger, image_grid, plot_run, read_metrics

    t_start = time.time()
    if resume and resume is not True:  # a damaged checkpoint is named before minutes of model loading
        CheckpointReader(resume)
    trainer = Trainer(cfg)
    trainer.monitor = HackingMonitor(cfg, trainer.acc)  # gold rewards and hacking alarms (monitors.py)
    acc, run = trainer.acc, cfg.run
    out_dir = Path(run.output_dir)
    start, summary = 0, {}
    if resume:
        if resume is True:
            ckpt = latest_checkpoint(out_dir, report=print if acc.is_main_process else None)
            if ckpt is None:
                raise FileNotFoundError(f"--resume: no intact checkpoint under {out_dir / 'checkpoints'}")
            if acc.is_main_process:
                print(f"resuming from {ckpt}")
        else:
            ckpt = Path(resume)
        state = load_checkpoint(ckpt, named_params=trainer.named_params, optimizer=trainer.optimizer,
                                ema=trainer.ema, rewards={**trainer.rewards, CHECKPOINT_NAME: trainer.objective,
                                                          MONITOR_NAME: trainer.monitor},
                                rank=acc.process_index, world=acc.num_processes)
        start, summary = state["step"], state.get("summary", {})
        trainer.step = start
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    logger = MetricsLogger(out_dir, run.tensorboard, run.wandb, to_dict(cfg), resume=bool(resume)) \
        if acc.is_main_process else None
    if start == 0 and run.eval_before:
        summary["before"] = evaluate(trainer, "before")
        if summary["before"] and logger:
            logger.log(0, eval_stats(summary["before"]))
    acc.wait_for_everyone()
    end = cfg.optim.steps if max_iterations is None else min(cfg.optim.steps, start + max_iterations)
    bar = tqdm(range(start, end), initial=start, total=cfg.optim.steps, disable=not acc.is_main_process,
               desc=f"train {cfg.optim.policy_loss}", dynamic_ncols=True)
    for it in bar:
        cpu, wall = time.process_time(), time.perf_counter()
        do_gen, do_disc = trainer.phase(it)
        batch, t_sample = timed(trainer.sample, it)
        (adv, stats), t_reward = timed(trainer.score, batch)
        t_update = 0.0
        if do_gen:
            upd, t_update = timed(trainer.update, batch, adv, it)
            stats.update(upd)
        if do_disc:
            stats.update(trainer.update_discriminators(batch))
        stats.update({"time/sample": t_sample, "time/reward": t_reward, "time/update": t_update,
                      "lr": trainer.optimizer.param_groups[0]["lr"]})
        alarms = trainer.monitor.observe(batch, stats, it)  # after the update: nothing it scores reaches it
        if "gold/total" in stats and cfg.monitor.base_kl_images and trainer.has_reference:
            stats["monitor/base_kl"] = base_distance(trainer.velocity, batch, cfg.monitor.base_kl_images, trainer.acc)
        # the iteration's cost (this process's threads, the reward pipeline's included; evaluation not counted)
        stats["time/cpu"], stats["time/wall"] = time.process_time() - cpu, time.perf_counter() - wall
        clock_before = summary.get("train_cpu_seconds", 0.0)
        clock = clock_before + stats["time/cpu"]
        if run.max_cpu_minutes or run.eval_every_cpu_minutes:
            clock = main_process_value(acc, clock)
        summary["train_cpu_seconds"] = clock  # kept in checkpoints: a resumed run continues its clock
        cpu_eval, cpu_stop = cpu_marks(run, clock_before, clock)
        trainer.step = it + 1
        due = run.eval_every and (it + 1) % run.eval_every == 0 or cpu_eval
        if due and it + 1 < cfg.optim.steps and not cpu_stop:  # the end's evaluation comes after the loop
            table = evaluate(trainer, f"{it + 1:05d}")
            if table:
                stats.update(eval_stats(table))
        if acc.is_main_process:
            if run.grid_every and (it + 1) % run.grid_every == 0 or it == start:
                g = image_grid(batch.images[: 4 * cfg.sample.group_size], cfg.sample.group_size, scale=3)
                (out_dir / "grids").mkdir(exist_ok=True)
                g.save(out_dir / "grids" / f"train-{it + 1:05d}.png")
            logger.log(it + 1, stats)
            post = {"reward": f"{stats['reward/mean']:.3f}"}
            strict_key = next((k for k in stats if k.endswith("/strict")), None)
            if strict_key:
                post["acc"] = f"{stats[strict_key]:.2f}"
            if "gold/total" in stats:
                post["gold"] = f"{stats['gold/total']:.3f}"
            if alarms:
                post["ALARM"] = ",".join(a.name for a in alarms)
                for a in alarms:
                    if a.first:
                        bar.write(f"iteration {it + 1}: {a.message}")
            bar.set_postfix(post)
        if run.save_every and (it + 1) % run.save_every == 0 and it + 1 < end:
            _save(trainer, it + 1, summary)
        if trainer.monitor.should_stop():  # every process saw the same alarms (monitors.py): all stop here
            summary["stopped_by_alarm"] = {"iteration": it + 1, "alarms": [a.message for a in alarms]}
            break
        if cpu_stop:  # every process holds the main process's clock: all stop here
            summary["stopped_by_cpu_budget"] = {"iteration": it + 1, "cpu_seconds": clock}
            break
    acc.wait_for_everyone()
    if trainer.step >= cfg.optim.steps or "stopped_by_cpu_budget" in summary:
        table = evaluate(trainer, "after")
        if table:
            summary["after"] = table
            if logger:
                logger.log(trainer.step, eval_stats(table))
    ckpt = _save(trainer, trainer.step, summary)
    final = trainer.save_final(out_dir / "lora" if trainer.policy.lora else out_dir / "model")
    if acc.is_main_process:
        plot_run(read_metrics(out_dir / "metrics.jsonl"), out_dir / "plot.png", objective=cfg.optim.policy_loss)
        summary.update({"wall_seconds": time.time() - t_start, "lora": str(final), "checkpoint": str(ckpt),
                        "iterations": trainer.step})
        if summary.get("before") and summary.get("after"):
            from .eval.shapes import paired_difference_ci

            d, lo, hi = paired_difference_ci(summary["before"]["strict"], summary["after"]["strict"],
                                             summary["after"]["tags"])
            summary["change"] = {"overall": d, "ci95": [lo, hi]}
        slim = {k: ({kk: vv for kk, vv in v.items() if kk not in ("strict", "tags")} if isinstance(v, dict) else v)
                for k, v in summary.items()}
        (out_dir / "summary.json").write_text(json.dumps(slim, indent=2))
        write_model_card(final, cfg, slim)
        logger.close()
    acc.wait_for_everyone()
    return summary


def _save(trainer: Trainer, step: int, summary: dict):
    """A checkpoint (every process takes part: LoRA gathered, shards written by their owners)."""
    from .checkpoint import save_checkpoint

    return save_checkpoint(trainer.cfg.run.output_dir, step, policy=trainer.policy,
                           named_params=trainer.named_params, optimizer=trainer.optimizer, ema=trainer.ema,
                           rewards={**trainer.rewards, CHECKPOINT_NAME: trainer.objective,
                                    **({MONITOR_NAME: trainer.monitor} if hasattr(trainer, "monitor") else {})},
                           state={"summary": summary, "ema_updates": trainer.ema.num_updates if trainer.ema else 0},
                           keep_last=trainer.cfg.run.keep_last, accelerator=trainer.acc)

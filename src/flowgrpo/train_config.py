"""The training config schema. Every field carries its reason; docs/configs.md expands them.

YAML files under configs/ are merged onto these defaults; unknown keys and wrong types are
rejected (flowgrpo.config). Defaults are Flow-GRPO's SD3.5 settings where a single CPU run
does not force otherwise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

log = logging.getLogger(__name__)
WIN_RATE_REWARDS = {"pref_winrate"}  # rewards whose batch mean is fixed by construction (each group's is 0.5)


@dataclass
class LoraConfig:
    enabled: bool = True  # False = full fine-tuning (keeps a frozen copy as reference when kl_beta > 0)
    rank: int = 32  # Flow-GRPO SD3.5: r 32
    alpha: int = 64  # scale alpha/rank = 2, as the reference
    init: str = "gaussian"  # gaussian (A ~ N(0, 1/r), the reference) or kaiming (peft's default); B = 0 either way
    targets: list[str] = field(default_factory=list)  # empty: the backend's default (attention projections)


@dataclass
class ModelConfig:
    path: str = "assets/shapes-sd3"  # hub id or diffusers folder
    backend: str = "auto"  # auto (from model_index.json), sd3 or flux
    dtype: str = "float32"  # float32 | bfloat16 | float16; log-prob math is always float32
    max_sequence_length: Optional[int] = None  # T5 tokens; None = the model folder's default (256 for SD3.5)
    gradient_checkpointing: bool = False  # trade compute for memory on big models
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapter settings (below)
    embedding_cache: Optional[str] = None  # folder written by `flowgrpo preprocess`: no text encoders needed
    shift: Optional[float] = None  # static shift s' = k s / (1 + (k - 1) s) (Pref-GRPO FLUX: 3); None = the scheduler's
    # gradient-free forwards (rollouts, NFT's old-policy velocities, held-out evaluation) with the LoRA
    # folded into the weights: a forward 1.5x faster on a CPU (an NFT iteration 1.2x), equal up to
    # float rounding (off: the results pages' runs repeat bit for bit)
    fold_lora: bool = False


@dataclass
class DataConfig:
    train: str = "shapes:train"  # prompt file (txt/jsonl/csv) or shapes:train
    test: Optional[str] = "shapes:test"  # held-out prompts for evaluation (empty: no evaluation)
    train_tags: list[str] = field(default_factory=list)  # keep only these GenEval tags (empty: all)
    test_tags: list[str] = field(default_factory=list)  # evaluate only these tags (empty: all)
    # draw a tag uniformly, then a prompt of it: GenEval's overall is a mean over tags, so a
    # tag with 3 training prompts matters as much as one with 38
    balance_tags: bool = False
    # with balance_tags: {tag: weight} draws tags in these proportions instead of uniformly (a tag
    # left out weighs 1): more draws where a tag learns fast, fewer on one already at its ceiling
    tag_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class SampleConfig:
    resolution: Optional[int] = None  # pixels; None = the model's default size
    num_steps: int = 10  # training rollouts are short (SD3.5 recipe: 10)
    guidance: float = 4.5  # CFG scale; 1.0 = CFG-free (no unconditional branch: half the compute)
    noise_level: float = 0.7  # a in sigma_t = a sqrt(sigma / (1 - sigma)); 0.7 SD3.5, 0.9 FLUX
    # flow_sde (Flow-GRPO) or cps (coefficients-preserving); ode (Euler) or dpm2 (DPM-Solver++(2M),
    # DiffusionNFT's sampler), both deterministic, only for objectives that do not use log-probs:
    # awm, nft, dgpo, reward_filtered, supervised
    kind: str = "flow_sde"
    # cps log-probs: "true" Gaussian density, or "reference" (-(x' - mean)^2 as the CPS reference code:
    # log-ratios 2 s_t^2 times the true ones, which changes when the clip binds); docs/fidelity.md
    cps_logprob: str = "true"
    # what the rewards judge: "final" = the decoded last SDE sample (it keeps the last step's noise);
    # "clean_prediction" = the last step's x - sigma v (Pref-GRPO official); docs/fidelity.md
    judged_image: str = "final"
    group_size: int = 8  # K images per prompt: the group advantages are normalised in
    prompts_per_step: int = 8  # groups per GRPO iteration, across all processes
    batch_size: int = 32  # images per forward pass per process while sampling
    same_noise_per_group: bool = False  # one initial noise per group (Pref-GRPO FLUX recipe)
    window_size: int = 0  # >0: Flow-GRPO-Fast, SDE only on [s, s + window_size)
    window_start_range: list[int] = field(default_factory=lambda: [0, 2])  # s drawn from [lo, hi]
    # random: s drawn each iteration (Flow-GRPO-Fast); progressive: MixGRPO's sliding window, s = lo,
    # lo + window_stride, ... up to hi, window_every iterations each, then back to lo
    window_schedule: str = "random"
    window_every: int = 25  # progressive: iterations at each window position (MixGRPO 25, Flash 20)
    window_stride: int = 1  # progressive: positions advanced each time (0 = a fixed window, MixGRPO-Flash*)
    window_after: str = "ode"  # solver of the steps after the window: ode (Euler) or dpm2 (MixGRPO-Flash)
    # share of the after-window steps kept, on the same shift curve (MixGRPO-Flash 0.4, Flash* 0.2; 1 = all)
    window_compress: float = 1.0


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"shapes_partial": 1.0})  # {registry name: weight}
    mix: str = "reward"  # reward: A from sum_k w_k r_k (Flow-GRPO); advantage: sum_k w_k A_k (Pref-GRPO)
    args: dict[str, Any] = field(default_factory=dict)  # {reward name: constructor kwargs}
    # Adversarial rewards: update the discriminator on `d_steps` of every `d_period` iterations
    # and the generator on the others (Adv-GRPO: 9 of 10); d_period 0 = update both every step.
    d_steps: int = 1
    d_period: int = 0  # see d_steps
    overlap: bool = True  # rewards run on each sampling batch while the next samples (false: after; same scores)
    # {registry name: weight} scored on the rollouts every run.gold_every iterations and logged as
    # gold/<name> and gold/total, never entering advantages: the yardstick the optimised reward is
    # checked against (e.g. train on pickscore, watch geneval or a VLM judge); empty = none
    gold: dict[str, float] = field(default_factory=dict)
    gold_args: dict[str, Any] = field(default_factory=dict)  # {gold reward name: constructor kwargs} (else reward.args)


@dataclass
class OptimConfig:
    steps: int = 100  # GRPO iterations (sample -> reward -> update)
    lr: float = 3e-4  # AdamW, Flow-GRPO LoRA
    lr_schedule: str = "constant"  # constant (the references) | cosine | linear decay to lr * lr_min_ratio at optim.steps
    lr_warmup: int = 0  # iterations of linear warm-up from 0 before the schedule
    lr_min_ratio: float = 0.0  # where cosine / linear decay ends, as a share of lr
    lr_decay_steps: int = 0  # > 0: cosine / linear decay only over the last this many iterations (0: after warm-up)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas of the reference
    weight_decay: float = 1e-4  # the reference value; small, LoRA weights start at 0 anyway
    max_grad_norm: float = 1.0  # clip the gradient norm: a few huge advantages must not blow up a step
    clip_range: float = 1e-4  # epsilon of the clipped ratio (1e-5 for Fast; dgpo: of exp(l_old - l))
    # KL to the reference (0.04 GenEval/OCR, 0.01 PickScore, 0 FLUX/Fast); awm, dgpo, reward_filtered
    # and supervised weigh mean (v - v_ref)^2 with it (nft has nft_kl_weight)
    kl_beta: float = 0.0
    adv_std: str = "group"  # group | global (the SD3 recipes normalise by the batch std)
    adv_eps: float = 1e-4  # added to the std so near-flat groups do not explode
    adv_std_ddof: int = 0  # std estimator: 0 population (Flow-GRPO reference), 1 unbiased (Pref-GRPO official)
    adv_clip: float = 5.0  # clamp advantages to +-adv_clip (reference: 5)
    adv_clip_after_mix: bool = False  # reward.mix advantage: clamp the mixed sum (Pref-GRPO official), not each A_k
    # GDPO (Pref-GRPO official): re-normalise the final advantage over the gathered batch,
    # (A - mean) / (std + adv_eps) with adv_std_ddof, then clamp; groups with no signal stay 0
    adv_batch_renorm: bool = False
    # skip groups whose rewards are all equal: no gradient under ratio/awm; under nft they have r = 0.5,
    # a pull toward the old policy that DiffusionNFT keeps (false) and that holds the shapes six-tag run steady
    drop_zero_signal: bool = True
    # The training objective (docs/objectives.md). ratio: Flow-GRPO, the clipped ratio of the SDE
    # steps' Gaussian log-probs. awm: Advantage Weighted Matching (arXiv 2509.25050), the same
    # clipped loss with the flow-matching loss of the final sample as log-prob surrogate: it
    # credits the whole image, not one step's noise. nft: DiffusionNFT (arXiv 2509.16117). dgpo:
    # DGPO (arXiv 2510.08425), a group-level DPO on the denoising loss. reward_filtered: flow matching on each group's best rollouts (RAFT-style). supervised:
    # flow matching on renderer targets, a calibration tool
    policy_loss: str = "ratio"
    awm_timesteps: int = 2  # awm: noise levels (logit-normal, as pretraining) drawn per sample and update
    # nft, reward_filtered, supervised: noise levels t per sample and update, each with fresh noise:
    # "rollout" = the sampler's own sigmas (timestep_mode/fraction pick them: 9 of 10, as DiffusionNFT),
    # or a count such as "2" of logit-normal draws
    fm_timesteps: str = "rollout"
    # nft, reward_filtered, supervised: [lo, hi] draws the noise levels uniformly there instead of
    # logit-normal (with "rollout": keeps the sigmas inside it); composition is decided at high noise
    fm_sigma_range: Optional[list[float]] = None
    nft_beta: float = 1.0  # nft: v+ = beta v + (1 - beta) v_old; 1 GenEval/PickScore, 0.1 OCR (smaller = stronger)
    # nft: what the clipped advantage becomes before r = A / adv_clip / 2 + 0.5: all (itself),
    # positive_only, negative_only, binary (its sign), one_only (1 if A > 0 else 0), as the official code
    nft_adv_mode: str = "all"
    nft_kl_weight: float = 1e-4  # nft: weight of mean (v - v_ref)^2, the official 1e-4 (0 = no reference forward)
    # nft: theta_old <- d theta_old + (1 - d) theta after each iteration, "step" = optimizer steps
    # so far. 0: d = nft_decay; 1: min(0.001 step, 0.5); 2: 0 for 75 steps, then min(0.0075 (step - 75), 0.999)
    nft_decay_type: int = 1
    nft_decay: float = 0.0  # nft, decay type 0: the constant d (0 = the old policy is the current one)
    nft_decay_flat: Optional[int] = None  # nft, types 1/2: steps with d = 0 (None: the type's 0 / 75)
    nft_decay_rate: Optional[float] = None  # nft, types 1/2: growth of d per step (None: 0.001 / 0.0075)
    nft_decay_max: Optional[float] = None  # nft, types 1/2: cap of d (None: 0.5 / 0.999)
    rf_select: str = "best"  # reward_filtered: best (one image a group, ties to the lowest index) / above_mean (A > 0) / all (control)
    rf_weighted: bool = False  # reward_filtered: weight selected samples by max(A, 0) instead of uniformly
    sup_target: str = "auto"  # supervised: target provider (auto = the first whose renderer accepts the prompt)
    timestep_mode: str = "first"  # first: the first fraction of SDE steps (fm_timesteps rollout: of all); random: some
    timestep_fraction: float = 0.99  # 0.99 of 10 steps -> 9 (the last, nearly clean, step is skipped)
    # ratio, timestep_mode random: "shared" = one subset for the whole iteration; "per_sample" = a
    # fresh subset per image from (seed, iteration, image index) (Pref-GRPO official)
    timestep_subset: str = "shared"
    timestep_exclude_last: bool = False  # ratio: never train the last step; the fraction takes the rest (Pref-GRPO)
    # ratio: Pref-GRPO's RatioNorm, log-ratio (logp - logp_old + mean (mu - mu_old)^2 / (2 std^2)) std
    # and each sample's clipped term divided by its step's sigma - sigma_next; flow_sde only; docs/fidelity.md
    ratio_norm: bool = False
    # forward objectives (awm, nft, dgpo, reward_filtered, supervised): the CFG scale of the velocities
    # the loss trains; None = sample.guidance. DGPO samples with CFG 4.5 and trains at 1.0
    train_guidance: Optional[float] = None
    # CFG training velocities: also backpropagate through the unconditional branch. false: it is
    # detached, as the Flow-GRPO reference trains (the gradient reaches the weights through the prompt)
    cfg_uncond_grad: bool = False
    # nft trains on clean samples from a deterministic sampler (DiffusionNFT: dpm2); true lets it
    # train on stochastic rollouts (sample.kind flow_sde / cps) on purpose
    nft_stochastic_rollouts: bool = False
    # forward objectives, fm_timesteps rollout: only the first K sampler steps are candidates (DGPO
    # trunc_steps + 1: 5 GenEval, 7 OCR / PickScore); None = all
    fm_rollout_steps: Optional[int] = None
    timestep_count: Optional[int] = None  # forward objectives: train this many candidates instead of a fraction
    fm_group_noise: bool = False  # forward objectives: one noise (and drawn noise level) per group at each draw (DGPO use_shared_noise)
    # forward objectives: the eps of x_t = (1 - t) x0 + t eps. fresh: a new draw per image and update
    # (DiffusionNFT); rollout: the image's own initial noise, so an ODE rollout's (noise, image) pair
    # is kept and the update says which image this noise should become (a reward-weighted reflow)
    fm_noise: str = "fresh"
    # DGPO (arXiv 2510.08425): per group weight sigmoid(dgpo_beta / K sum_i A_i (l_i - l_ref,i)) on
    # A_i l_i, l = mean (v - (eps - x0))^2; docs/objectives.md
    dgpo_beta: float = 100.0  # beta_dpo: 100 GenEval / OCR, 10 PickScore
    dgpo_clip: bool = True  # PPO-style: no gradient where exp(l_old - l) leaves 1 +- clip_range in A's direction
    dgpo_ref: str = "base"  # the l_ref of the group weight: base (adapter off) or old (the lagging copy; EMA-ref mode)
    dgpo_ref_guidance: Optional[float] = None  # CFG of the reference velocity (kl_cfg); None = the train guidance
    # the old copy: theta_old <- d theta_old + (1 - d) theta after each optimizer step, d = min(rate step, max)
    dgpo_old_decay_rate: float = 0.001  # the official min(0.001 step, 0.3)
    dgpo_old_decay_max: float = 0.3  # cap of d (official 0.3)
    dgpo_sample_old_after: Optional[int] = None  # rollouts by the old copy once this many optimizer steps are done
    inner_epochs: int = 1  # passes over each batch of rollouts
    train_batch_size: int = 32  # samples per forward/backward per process
    optimizer_steps: int = 1  # optimizer steps per iteration (the batch is split into this many chunks)
    ema_decay: float = 0.0  # EMA of trained weights for eval and saving (0.9 every 8 in SD3.5 recipes; 0 = off)
    ema_every: int = 8  # iterations between EMA updates
    ema_warmup: bool = False  # decay min((1 + n) / (10 + n), ema_decay), n = EMA updates so far (Adv-GRPO official)


@dataclass
class RunConfig:
    output_dir: str = "runs/train"  # metrics, grids, checkpoints, the final LoRA and summary.json go here
    seed: int = 0  # every random draw (prompts, noise, windows, LoRA init) derives from it
    eval_every: int = 0  # iterations between held-out evaluations (0 = only before and after)
    eval_before: bool = True  # evaluate the base model first (the "before" column)
    eval_images_per_prompt: int = 8  # 52 shapes test prompts x 8 = 416 images per evaluation
    # > 0: about this many images per tag instead, spread over its prompts: the overall averages
    # tags, so a tag of 2 test prompts gets the precision of one of 34 (shapes: 2 vs 34 prompts)
    eval_images_per_tag: int = 0
    eval_steps: int = 20  # ODE steps at evaluation (SD3.5: 40)
    eval_solver: str = "ode"  # deterministic sampler at evaluation: ode (Euler) or dpm2 (DGPO evaluates with it)
    eval_guidance: Optional[float] = None  # None: same as sample.guidance
    eval_batch_size: int = 64  # images per forward pass at evaluation
    save_every: int = 0  # iterations between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept
    grid_every: int = 0  # iterations between sample grids (0 = first and last only)
    tensorboard: bool = True  # when tensorboard is installed
    wandb: bool = False  # log to Weights & Biases too (pip install flowgrpo[wandb])
    threads: int = 0  # torch CPU threads (0 = torch default)
    dump_advantages: bool = False  # write each process's rewards/advantages per iteration (debugging, tests)
    # rewards of the held-out evaluation for prompts the shapes verifier cannot check ({name: weight});
    # empty: the training rewards (reward.weights). Shapes prompts are always judged by the verifier.
    eval_rewards: dict[str, float] = field(default_factory=dict)
    gold_every: int = 1  # iterations between gold-reward scorings (reward.gold); a costly judge may want 5-10
    # end the run (checkpoint and final weights written, resumable) when alarms have fired on
    # monitor.stop_after consecutive iterations
    stop_on_alarm: bool = False
    # end the run (evaluated, checkpointed, final weights written) once its iterations have used this many
    # CPU-minutes: the main process's CPU time in sampling, rewards and update, evaluation not counted; unlike
    # wall time it leaves out the time other processes hold the cores (0 = off)
    max_cpu_minutes: float = 0.0
    eval_every_cpu_minutes: float = 0.0  # a held-out evaluation each time that CPU time passes a multiple of it (0 = off)


@dataclass
class MonitorConfig:
    """Reward-hacking alarms (monitors.py): each compares a statistic with its threshold every iteration."""

    enabled: bool = True  # compute the monitors (cheap: downsampled images and logged scalars)
    # the first iterations of a run (the base model's rollouts) set the diversity and image-statistic baselines
    base_iterations: int = 3
    # diversity, drift and amplification alarms use the mean of the last `smooth` iterations: one odd batch does not fire
    smooth: int = 4
    # proxy-gold divergence: least-squares slopes of the proxy (proxy_key) and gold/total over the last `window`
    # gold scorings; fires when the proxy's slope is above +divergence_z standard errors and gold's below -divergence_z
    window: int = 12
    # gold drop: gold/total's mean over the last gold_window scorings this far (plus gold_drop_z standard errors
    # of the two means' difference) below its best such window, while the proxy's mean is at least its level
    # then; in gold/total's units, 0 = off
    gold_drop: float = 0.05
    # see gold_drop: the best window is the maximum of many noisy means, so its noise is added to the margin
    # (2: no firing in 40 noise runs of 300 scorings at the shapes runs' gold noise; at 3 SE as a floor, 42%)
    gold_drop_z: float = 2.0
    gold_window: int = 20  # see gold_drop; 20 scorings of 64 shapes images put the noise of a mean near 0.01
    # the logged value the divergence and gold_drop alarms read as the optimised reward: reward/mean,
    # reward/<name>/mean, or gold/<name>. A win rate's mean is 0.5 by construction, so a pairwise run logs the judge's own score as a
    # weight-0 gold reward and points this at it (docs/reward-hacking.md)
    proxy_key: str = "reward/mean"
    divergence_z: float = 3.0  # see window; 3 SE keeps false alarms on white noise below 1 in 1000 checks
    # diversity collapse: within-group spread of 8x8 downsampled images as a share of the base's; fires below this
    diversity_ratio: float = 0.35
    # image-statistic drift (brightness, saturation, high-frequency energy, RMS norm of the final latents):
    # |batch mean - base mean| in units of the base's per-image standard deviation; fires above this
    # (1.5 fired on an unhacked 16-image shapes run)
    drift_sd: float = 2.0
    # advantage amplification (adv std / within-group reward std, Pref-GRPO's illusory advantage): fires above
    # this; 0 = off. Group normalisation of tiny reward gaps into unit advantages is what gets hacked
    amplification_max: float = 30.0
    # with reward.gold: at each gold scoring, monitor/base_kl = mean (v - v_base)^2 over this many local
    # rollouts' states, how far the policy has moved from the base (gold is read against it); 0 = off.
    # Costs 2 x images x sampler steps forwards (CFG doubles them) per gold scoring
    base_kl_images: int = 4
    # run.stop_on_alarm waits for alarms on this many consecutive iterations: a transient drift (2-4 iterations
    # on an anchored shapes run whose gold held) does not end a healthy run; hacked runs alarm almost every
    # iteration, so the wait costs them 4-10 (docs/results/over-optimisation.md)
    stop_after: int = 5


@dataclass
class ParallelConfig:
    # ddp: every process holds the whole model, gradients are all-reduced; fsdp2: weights, gradients
    # and optimizer states are sharded over the processes (fully_shard, one unit per transformer block)
    strategy: str = "ddp"
    cpu_offload: bool = False  # fsdp2: keep the shards (and optimizer states) in CPU memory, gathered per block
    # fsdp2: free a block's gathered weights after its forward (less memory, a second all-gather in backward)
    reshard_after_forward: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks OmegaConf cannot express; messages name the key."""
    from .algorithms.objectives import OBJECTIVES
    from .algorithms.objectives.nft import ADV_MODES
    from .algorithms.objectives.reward_filtered import SELECT
    from .algorithms.objectives.targets import PROVIDERS
    from .config import ConfigError
    from .sampling import AFTER_WINDOW, JUDGED_IMAGES, SAMPLERS

    s, o, r = cfg.sample, cfg.optim, cfg.reward
    tw = cfg.data.tag_weights
    if tw and not cfg.data.balance_tags:
        raise ConfigError("data.tag_weights weighs the tag draw of data.balance_tags: set data.balance_tags: true")
    if tw and any(not w >= 0 for w in tw.values()):
        raise ConfigError(f"data.tag_weights must be >= 0 (a tag left out weighs 1), got {dict(tw)}")
    if cfg.parallel.strategy not in ("ddp", "fsdp2"):
        raise ConfigError(f"parallel.strategy must be 'ddp' or 'fsdp2', got {cfg.parallel.strategy!r}")
    if o.policy_loss not in OBJECTIVES:
        raise ConfigError(f"optim.policy_loss must be one of {', '.join(OBJECTIVES)}, got {o.policy_loss!r}")
    if s.kind not in SAMPLERS:
        raise ConfigError(f"sample.kind must be one of {', '.join(SAMPLERS)}, got {s.kind!r}")
    if s.kind in ("ode", "dpm2") and OBJECTIVES[o.policy_loss].needs_sde:
        stoch = [n for n, c in OBJECTIVES.items() if not c.needs_sde]
        raise ConfigError(f"sample.kind {s.kind!r} with optim.policy_loss {o.policy_loss}: it needs stochastic steps "
                          f"(flow_sde or cps); {s.kind!r} works with {', '.join(stoch)}")
    if s.kind in ("ode", "dpm2") and s.same_noise_per_group:
        raise ConfigError(f"sample.same_noise_per_group with sample.kind {s.kind}: a deterministic sampler from one "
                          "initial noise draws the same image for the whole group (no reward signal); set "
                          "sample.same_noise_per_group: false or sample a stochastic kind")
    if s.kind == "dpm2" and s.window_size:
        raise ConfigError("sample.window_size with sample.kind dpm2: a window marks stochastic steps; use "
                          "sample.kind flow_sde (or cps) inside it and sample.window_after: dpm2 after it")
    if o.policy_loss == "nft" and s.kind in ("flow_sde", "cps") and not o.nft_stochastic_rollouts:
        raise ConfigError(f"optim.policy_loss nft with sample.kind {s.kind}: NFT trains on clean samples of a "
                          "deterministic sampler (DiffusionNFT: dpm2, 10 steps); set sample.kind: dpm2 (or ode), or "
                          "optim.nft_stochastic_rollouts: true to train on stochastic rollouts on purpose")
    if o.train_guidance is not None and OBJECTIVES[o.policy_loss].needs_sde:
        raise ConfigError(f"optim.train_guidance with optim.policy_loss {o.policy_loss}: the ratio scores the "
                          "sampler's own steps, so it trains at sample.guidance; remove optim.train_guidance")
    if cfg.run.eval_images_per_prompt < 1 or cfg.run.eval_images_per_tag < 0:
        raise ConfigError(f"run.eval_images_per_prompt must be >= 1 and run.eval_images_per_tag >= 0 (0: off), got "
                          f"{cfg.run.eval_images_per_prompt} and {cfg.run.eval_images_per_tag}")
    if cfg.run.eval_solver not in AFTER_WINDOW:
        raise ConfigError(f"run.eval_solver must be one of {', '.join(AFTER_WINDOW)}, got {cfg.run.eval_solver!r}")
    if s.window_schedule not in ("random", "progressive"):
        raise ConfigError(f"sample.window_schedule must be 'random' or 'progressive', got {s.window_schedule!r}")
    if s.window_every < 1 or s.window_stride < 0:
        raise ConfigError(f"sample.window_every must be >= 1 and sample.window_stride >= 0, got {s.window_every}, "
                          f"{s.window_stride}")
    if s.window_after not in AFTER_WINDOW:
        raise ConfigError(f"sample.window_after must be one of {', '.join(AFTER_WINDOW)}, got {s.window_after!r}")
    if not 0.0 < s.window_compress <= 1.0 or (s.window_compress < 1.0 and not s.window_size):
        raise ConfigError(f"sample.window_compress must be in (0, 1] and below 1 only with a window "
                          f"(sample.window_size > 0), got {s.window_compress}")
    if s.group_size < 2:
        raise ConfigError("sample.group_size must be >= 2: advantages are relative to the group")
    if s.window_size and not (len(s.window_start_range) == 2 and
                              0 <= s.window_start_range[0] <= s.window_start_range[1]
                              and s.window_start_range[1] + s.window_size <= s.num_steps):
        raise ConfigError(f"sample.window_start_range {s.window_start_range} + window_size {s.window_size} "
                          f"must fit in sample.num_steps {s.num_steps}")
    if s.cps_logprob not in ("true", "reference"):
        raise ConfigError(f"sample.cps_logprob must be 'true' or 'reference', got {s.cps_logprob!r}")
    if s.judged_image not in JUDGED_IMAGES:
        raise ConfigError(f"sample.judged_image must be one of {', '.join(JUDGED_IMAGES)}, got {s.judged_image!r}")
    if o.timestep_subset not in ("shared", "per_sample"):
        raise ConfigError(f"optim.timestep_subset must be 'shared' or 'per_sample', got {o.timestep_subset!r}")
    if o.timestep_subset == "per_sample" and o.timestep_mode != "random":
        raise ConfigError("optim.timestep_subset per_sample draws a random subset per image: it needs "
                          f"optim.timestep_mode random, got {o.timestep_mode!r}")
    forward = o.policy_loss not in ("ratio", "awm")  # objectives that pick noise levels (ForwardObjective)
    if o.timestep_subset == "per_sample" and not (o.policy_loss == "ratio" or forward and o.fm_timesteps == "rollout"):
        raise ConfigError("optim.timestep_subset per_sample picks each image's trained steps: it applies to the ratio "
                          "objective and to nft, dgpo, reward_filtered, supervised with optim.fm_timesteps rollout, "
                          f"not to optim.policy_loss {o.policy_loss} with fm_timesteps {o.fm_timesteps}")
    if o.timestep_exclude_last and o.policy_loss != "ratio":
        raise ConfigError("optim.timestep_exclude_last applies to the ratio objective's trained steps (as Pref-GRPO), "
                          f"not to optim.policy_loss {o.policy_loss}")
    if (o.fm_rollout_steps is not None or o.timestep_count is not None or o.fm_group_noise) and not forward:
        raise ConfigError("optim.fm_rollout_steps, optim.timestep_count and optim.fm_group_noise pick the noise of the "
                          f"forward objectives (nft, dgpo, reward_filtered, supervised), not of {o.policy_loss}")
    for key in ("fm_rollout_steps", "timestep_count"):
        if getattr(o, key) is not None and getattr(o, key) < 1:
            raise ConfigError(f"optim.{key} must be >= 1 (or null), got {getattr(o, key)}")
    if o.fm_rollout_steps is not None and o.fm_rollout_steps > s.num_steps:
        raise ConfigError(f"optim.fm_rollout_steps {o.fm_rollout_steps} exceeds sample.num_steps {s.num_steps}")
    if o.timestep_subset == "per_sample" and forward and o.fm_sigma_range is not None:
        raise ConfigError("optim.timestep_subset per_sample with optim.fm_sigma_range: the range would drop a "
                          "different number of steps per image; use one or the other")
    if o.fm_noise not in ("fresh", "rollout"):
        raise ConfigError(f"optim.fm_noise must be fresh or rollout, got {o.fm_noise!r}")
    if o.fm_noise == "rollout" and (not forward or o.fm_group_noise):
        raise ConfigError("optim.fm_noise rollout trains forward objectives (nft, dgpo, reward_filtered, supervised) "
                          f"at each image's own initial noise: not {o.policy_loss}, and not with optim.fm_group_noise")
    if o.dgpo_beta <= 0 or o.dgpo_ref not in ("base", "old"):
        raise ConfigError(f"optim.dgpo_beta must be > 0 and optim.dgpo_ref base or old, got {o.dgpo_beta}, "
                          f"{o.dgpo_ref!r}")
    if not (o.dgpo_old_decay_rate >= 0 and 0 <= o.dgpo_old_decay_max < 1):
        raise ConfigError("optim.dgpo_old_decay_rate must be >= 0 and optim.dgpo_old_decay_max in [0, 1)")
    if o.dgpo_sample_old_after is not None and o.dgpo_sample_old_after < 0:
        raise ConfigError(f"optim.dgpo_sample_old_after must be >= 0 (or null), got {o.dgpo_sample_old_after}")
    if o.timestep_exclude_last and (s.num_steps < 2 or s.window_size == 1
                                    and s.window_start_range[-1] == s.num_steps - 1):
        raise ConfigError("optim.timestep_exclude_last leaves no step to train: the SDE window can be the last "
                          "step alone (or sample.num_steps is 1)")
    if o.ratio_norm and (o.policy_loss != "ratio" or s.kind != "flow_sde"):
        raise ConfigError(f"optim.ratio_norm is Pref-GRPO's normalisation of the flow_sde ratio: it needs "
                          f"optim.policy_loss ratio and sample.kind flow_sde, got {o.policy_loss} / {s.kind}")
    if o.adv_std_ddof not in (0, 1):
        raise ConfigError(f"optim.adv_std_ddof must be 0 (population) or 1 (unbiased), got {o.adv_std_ddof}")
    if o.adv_std not in ("group", "global"):
        raise ConfigError(f"optim.adv_std must be 'group' or 'global', got {o.adv_std!r}")
    if o.policy_loss == "awm" and o.awm_timesteps < 1:
        raise ConfigError(f"optim.awm_timesteps must be >= 1 with policy_loss awm, got {o.awm_timesteps}")
    if o.fm_timesteps != "rollout" and not (o.fm_timesteps.isdigit() and int(o.fm_timesteps) >= 1):
        raise ConfigError(f"optim.fm_timesteps must be 'rollout' or a count >= 1, got {o.fm_timesteps!r}")
    if o.lr_schedule not in ("constant", "cosine", "linear"):
        raise ConfigError(f"optim.lr_schedule must be constant, cosine or linear, got {o.lr_schedule!r}")
    if not 0 <= o.lr_decay_steps <= o.steps - o.lr_warmup:
        raise ConfigError(f"optim.lr_decay_steps must be in [0, optim.steps - optim.lr_warmup] = "
                          f"[0, {o.steps - o.lr_warmup}], got {o.lr_decay_steps}")
    if o.lr_decay_steps and o.lr_schedule == "constant":
        raise ConfigError(f"optim.lr_decay_steps={o.lr_decay_steps} has no decay to shape under optim.lr_schedule "
                          "constant; set optim.lr_schedule to linear or cosine, or lr_decay_steps to 0")
    if o.lr_warmup < 0 or not 0.0 <= o.lr_min_ratio <= 1.0:
        raise ConfigError(f"optim.lr_warmup must be >= 0 and optim.lr_min_ratio in [0, 1], got {o.lr_warmup}, "
                          f"{o.lr_min_ratio}")
    if o.fm_sigma_range is not None and not (len(o.fm_sigma_range) == 2 and
                                              0.0 <= o.fm_sigma_range[0] < o.fm_sigma_range[1] <= 1.0):
        raise ConfigError(f"optim.fm_sigma_range must be [lo, hi] with 0 <= lo < hi <= 1, got {o.fm_sigma_range}")
    if o.nft_beta <= 0:
        raise ConfigError(f"optim.nft_beta must be > 0 (it divides the loss), got {o.nft_beta}")
    if o.nft_adv_mode not in ADV_MODES:
        raise ConfigError(f"optim.nft_adv_mode must be one of {', '.join(ADV_MODES)}, got {o.nft_adv_mode!r}")
    if o.nft_kl_weight < 0:
        raise ConfigError(f"optim.nft_kl_weight must be >= 0, got {o.nft_kl_weight}")
    if o.nft_decay_type not in (0, 1, 2):
        raise ConfigError(f"optim.nft_decay_type must be 0, 1 or 2, got {o.nft_decay_type}")
    for key in ("nft_decay", "nft_decay_max"):
        if getattr(o, key) is not None and not 0 <= getattr(o, key) <= 1:
            raise ConfigError(f"optim.{key} must be in [0, 1], got {getattr(o, key)}")
    if (o.nft_decay_rate or 0) < 0 or (o.nft_decay_flat or 0) < 0:
        raise ConfigError("optim.nft_decay_rate and optim.nft_decay_flat must be >= 0")
    if o.rf_select not in SELECT:
        raise ConfigError(f"optim.rf_select must be one of {', '.join(SELECT)}, got {o.rf_select!r}")
    if o.sup_target != "auto" and o.sup_target not in PROVIDERS:
        raise ConfigError(f"optim.sup_target must be auto or one of {', '.join(PROVIDERS)}, got {o.sup_target!r}")
    if o.timestep_mode not in ("first", "random"):
        raise ConfigError(f"optim.timestep_mode must be 'first' or 'random', got {o.timestep_mode!r}")
    if r.mix not in ("reward", "advantage"):
        raise ConfigError(f"reward.mix must be 'reward' or 'advantage', got {r.mix!r}")
    if not r.weights:
        raise ConfigError("reward.weights is empty: name at least one reward, e.g. {shapes_partial: 1.0}")
    m = cfg.monitor
    if cfg.run.max_cpu_minutes < 0 or cfg.run.eval_every_cpu_minutes < 0:
        raise ConfigError(f"run.max_cpu_minutes and run.eval_every_cpu_minutes must be >= 0 (0: off), got "
                          f"{cfg.run.max_cpu_minutes} and {cfg.run.eval_every_cpu_minutes}")
    if cfg.run.gold_every < 1:
        raise ConfigError(f"run.gold_every must be >= 1 (iterations between gold scorings), got {cfg.run.gold_every}")
    if m.gold_window < 2 or m.gold_drop < 0:
        raise ConfigError(f"monitor.gold_window must be >= 2 and monitor.gold_drop >= 0 (0: off), got "
                          f"{m.gold_window} and {m.gold_drop}")
    if m.stop_after < 1:
        raise ConfigError(f"monitor.stop_after must be >= 1 (consecutive alarming iterations), got {m.stop_after}")
    if m.window < 3 or m.base_iterations < 1 or m.smooth < 1:
        raise ConfigError(f"monitor.window must be >= 3 (a slope's standard error needs 3 points), "
                          f"monitor.base_iterations and monitor.smooth >= 1; got {m.window}, {m.base_iterations}, "
                          f"{m.smooth}")
    keys = ["reward/mean", *(f"reward/{n}/mean" for n in r.weights), *(f"gold/{n}" for n in r.gold)]
    if m.proxy_key not in keys:
        raise ConfigError(f"monitor.proxy_key={m.proxy_key!r} is not logged by this run: choose one of {keys} "
                          f"(a gold/<name> key needs that name in reward.gold, weight 0 keeps it out of gold/total)")
    if m.proxy_key == "reward/mean" and set(r.weights) <= WIN_RATE_REWARDS and r.gold:
        log.warning(f"reward/mean of a win-rate reward ({', '.join(r.weights)}) is 0.5 by construction, so the "
                    "divergence alarm cannot fire: score the judge's own pointwise score as a weight-0 gold reward "
                    "and set monitor.proxy_key=gold/<its name>")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if (s.group_size * s.prompts_per_step) % max(1, o.optimizer_steps):
        raise ConfigError("optim.optimizer_steps must divide sample.group_size * sample.prompts_per_step")
    micro = math.ceil(s.group_size * s.prompts_per_step / max(1, o.train_batch_size))
    if o.optimizer_steps > micro:
        # each optimizer step needs at least one micro-batch; more steps than micro-batches were silently merged
        raise ConfigError(
            f"optim.optimizer_steps={o.optimizer_steps} needs at least that many micro-batches, but "
            f"{s.group_size * s.prompts_per_step} samples in batches of optim.train_batch_size={o.train_batch_size} "
            f"make {micro}: set optim.train_batch_size <= {s.group_size * s.prompts_per_step // o.optimizer_steps}")
    return cfg

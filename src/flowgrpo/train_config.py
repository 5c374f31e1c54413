"""The training config schema. Every field carries its reason; docs/configs.md expands them.

YAML files under configs/ are merged onto these defaults; unknown keys and wrong types are
rejected (flowgrpo.config). Defaults are Flow-GRPO's SD3.5 settings where a single CPU run
does not force otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class LoraConfig:
    enabled: bool = True  # False = full fine-tuning (keeps a frozen copy as reference when kl_beta > 0)
    rank: int = 32  # Flow-GRPO SD3.5: r 32
    alpha: int = 64  # scale alpha/rank = 2, as the reference
    init: str = "gaussian"  # peft init_lora_weights; B = 0 either way, so step 0 is the base model
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


@dataclass
class DataConfig:
    train: str = "shapes:train"  # prompt file (txt/jsonl/csv) or shapes:train
    test: Optional[str] = "shapes:test"  # held-out prompts for evaluation (empty: no evaluation)
    train_tags: list[str] = field(default_factory=list)  # keep only these GenEval tags (empty: all)
    test_tags: list[str] = field(default_factory=list)  # evaluate only these tags (empty: all)
    # draw a tag uniformly, then a prompt of it: GenEval's overall is a mean over tags, so a
    # tag with 3 training prompts matters as much as one with 38
    balance_tags: bool = False


@dataclass
class SampleConfig:
    resolution: Optional[int] = None  # pixels; None = the model's default size
    num_steps: int = 10  # training rollouts are short (SD3.5 recipe: 10)
    guidance: float = 4.5  # CFG scale; 1.0 = CFG-free (no unconditional branch: half the compute)
    noise_level: float = 0.7  # a in sigma_t = a sqrt(sigma / (1 - sigma)); 0.7 SD3.5, 0.9 FLUX
    kind: str = "flow_sde"  # flow_sde (Flow-GRPO) or cps (coefficients-preserving)
    group_size: int = 8  # K images per prompt: the group advantages are normalised in
    prompts_per_step: int = 8  # groups per GRPO iteration, across all processes
    batch_size: int = 32  # images per forward pass per process while sampling
    same_noise_per_group: bool = False  # one initial noise per group (Pref-GRPO FLUX recipe)
    window_size: int = 0  # >0: Flow-GRPO-Fast, SDE only on [s, s + window_size)
    window_start_range: list[int] = field(default_factory=lambda: [0, 2])  # s drawn from [lo, hi]


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"shapes_partial": 1.0})  # {registry name: weight}
    mix: str = "reward"  # reward: A from sum_k w_k r_k (Flow-GRPO); advantage: sum_k w_k A_k (Pref-GRPO)
    args: dict[str, Any] = field(default_factory=dict)  # {reward name: constructor kwargs}
    # Adversarial rewards: update the discriminator on `d_steps` of every `d_period` iterations
    # and the generator on the others (Adv-GRPO: 9 of 10); d_period 0 = update both every step.
    d_steps: int = 1
    d_period: int = 0  # see d_steps


@dataclass
class OptimConfig:
    steps: int = 100  # GRPO iterations (sample -> reward -> update)
    lr: float = 3e-4  # AdamW, Flow-GRPO LoRA
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas of the reference
    weight_decay: float = 1e-4  # the reference value; small, LoRA weights start at 0 anyway
    max_grad_norm: float = 1.0  # clip the gradient norm: a few huge advantages must not blow up a step
    clip_range: float = 1e-4  # epsilon of the clipped ratio (1e-5 for Fast)
    kl_beta: float = 0.0  # KL to the reference (0.04 GenEval/OCR, 0.01 PickScore, 0 FLUX/Fast)
    adv_std: str = "group"  # group | global (the SD3 recipes normalise by the batch std)
    adv_eps: float = 1e-4  # added to the std so near-flat groups do not explode
    adv_clip: float = 5.0  # clamp advantages to +-adv_clip (reference: 5)
    drop_zero_signal: bool = True  # skip groups whose rewards are all equal (no gradient, saves time)
    # ratio: Flow-GRPO, the clipped ratio of the SDE steps' Gaussian log-probs. awm: Advantage
    # Weighted Matching (arXiv 2509.25050), the same clipped loss with the flow-matching loss of
    # the final sample as log-prob surrogate: it credits the whole image, not one step's noise
    policy_loss: str = "ratio"
    awm_timesteps: int = 2  # awm: noise levels (logit-normal, as pretraining) drawn per sample and update
    timestep_mode: str = "first"  # first: the first fraction of SDE steps; random: a random subset
    timestep_fraction: float = 0.99  # 0.99 of 10 steps -> 9 (the last, nearly clean, step is skipped)
    inner_epochs: int = 1  # passes over each batch of rollouts
    train_batch_size: int = 32  # samples per forward/backward per process
    optimizer_steps: int = 1  # optimizer steps per iteration (the batch is split into this many chunks)
    ema_decay: float = 0.0  # EMA of trained weights for eval and saving (0.9 every 8 in SD3.5 recipes; 0 = off)
    ema_every: int = 8  # iterations between EMA updates


@dataclass
class RunConfig:
    output_dir: str = "runs/train"  # metrics, grids, checkpoints, the final LoRA and summary.json go here
    seed: int = 0  # every random draw (prompts, noise, windows, LoRA init) derives from it
    eval_every: int = 0  # iterations between held-out evaluations (0 = only before and after)
    eval_before: bool = True  # evaluate the base model first (the "before" column)
    eval_images_per_prompt: int = 8  # 52 shapes test prompts x 8 = 416 images per evaluation
    eval_steps: int = 20  # ODE steps at evaluation (SD3.5: 40)
    eval_guidance: Optional[float] = None  # None: same as sample.guidance
    eval_batch_size: int = 64  # images per forward pass at evaluation
    save_every: int = 0  # iterations between checkpoints (0 = only at the end)
    keep_last: int = 2  # checkpoints kept
    grid_every: int = 0  # iterations between sample grids (0 = first and last only)
    tensorboard: bool = True  # when tensorboard is installed
    wandb: bool = False  # log to Weights & Biases too (pip install flowgrpo[wandb])
    threads: int = 0  # torch CPU threads (0 = torch default)
    dump_advantages: bool = False  # write each process's rewards/advantages per iteration (debugging, tests)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks OmegaConf cannot express; messages name the key."""
    from .config import ConfigError
    from .sampling import KINDS

    s, o, r = cfg.sample, cfg.optim, cfg.reward
    if s.kind not in KINDS or (s.kind == "ode" and o.policy_loss != "awm"):
        raise ConfigError(f"sample.kind must be 'flow_sde' or 'cps' (the ratio loss needs stochastic steps; "
                          f"'ode' only with optim.policy_loss=awm), got {s.kind!r}")
    if s.group_size < 2:
        raise ConfigError("sample.group_size must be >= 2: advantages are relative to the group")
    if s.window_size and not (len(s.window_start_range) == 2 and
                              0 <= s.window_start_range[0] <= s.window_start_range[1]
                              and s.window_start_range[1] + s.window_size <= s.num_steps):
        raise ConfigError(f"sample.window_start_range {s.window_start_range} + window_size {s.window_size} "
                          f"must fit in sample.num_steps {s.num_steps}")
    if o.adv_std not in ("group", "global"):
        raise ConfigError(f"optim.adv_std must be 'group' or 'global', got {o.adv_std!r}")
    if o.policy_loss not in ("ratio", "awm"):
        raise ConfigError(f"optim.policy_loss must be 'ratio' or 'awm', got {o.policy_loss!r}")
    if o.policy_loss == "awm" and o.awm_timesteps < 1:
        raise ConfigError(f"optim.awm_timesteps must be >= 1 with policy_loss awm, got {o.awm_timesteps}")
    if o.timestep_mode not in ("first", "random"):
        raise ConfigError(f"optim.timestep_mode must be 'first' or 'random', got {o.timestep_mode!r}")
    if r.mix not in ("reward", "advantage"):
        raise ConfigError(f"reward.mix must be 'reward' or 'advantage', got {r.mix!r}")
    if not r.weights:
        raise ConfigError("reward.weights is empty: name at least one reward, e.g. {shapes_partial: 1.0}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if (s.group_size * s.prompts_per_step) % max(1, o.optimizer_steps):
        raise ConfigError("optim.optimizer_steps must divide sample.group_size * sample.prompts_per_step")
    return cfg

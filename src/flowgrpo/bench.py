"""`flowgrpo bench CONFIG`: where an iteration's time goes (sampling, reward wait, update), model
evaluations (NFE) per trained sample, and peak memory. A benchmark, not a test: it prints
figures; docs/performance.md records them.

Rewards run while sampling goes on (reward.overlap), so "reward wait" is the part of their
time that sampling did not hide, and "reward compute" the time spent inside reward calls.
`--remote-reward URL` scores with a reward server instead of the config's rewards; with
`flowgrpo serve-reward NAME --bench-latency S` it stands for a reward model that takes S
seconds an image."""

from __future__ import annotations

import resource
import time

import numpy as np
import torch


def nfe_per_sample(cfg) -> dict[str, float]:
    """Transformer evaluations per image in one iteration (a CFG step counts 2)."""
    s, o = cfg.sample, cfg.optim
    cfg_mult = 2 if s.guidance != 1.0 else 1
    from .algorithms import select_timesteps

    # the stochastic steps of the sampler (a Fast window at its latest start: the one that can
    # hold the last step, which timestep_exclude_last then leaves out)
    sde = torch.ones(s.num_steps, dtype=torch.bool)
    if s.window_size:
        sde[:] = False
        start = s.window_start_range[1]
        sde[start:start + s.window_size] = True
    trained = len(select_timesteps(sde, o.timestep_mode, o.timestep_fraction, torch.Generator().manual_seed(0),
                                   exclude_last=o.timestep_exclude_last))
    sampling = s.num_steps * cfg_mult
    # training forward passes re-run the trained steps; a KL term adds a reference pass each
    training = trained * cfg_mult * o.inner_epochs * (2 if o.kl_beta > 0 else 1)
    return {"sampling": sampling, "training": training, "total": sampling + training, "trained_steps": trained}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def run_bench(config: str, overrides: list[str], iterations: int = 3, remote_reward: str | None = None) -> dict:
    from .config import load_config
    from .train_config import TrainConfig, validate
    from .trainer import Trainer

    cfg = load_config(TrainConfig, config, list(overrides) + ["run.tensorboard=false"])
    if remote_reward:
        cfg.reward.weights, cfg.reward.args = {f"remote:{remote_reward}": 1.0}, {}
    cfg = validate(cfg)
    trainer = Trainer(cfg)
    rows = []
    for it in range(iterations + 1):  # the first iteration warms up caches and is not counted
        t0 = time.perf_counter()
        batch = trainer.sample(it)
        t1 = time.perf_counter()
        adv, stats = trainer.score(batch)
        t2 = time.perf_counter()
        trainer.update(batch, adv, it)
        t3 = time.perf_counter()
        if it:
            rows.append((t1 - t0, t2 - t1, t3 - t2, stats["time/reward_compute"]))
    samp, rew, upd, compute = (float(np.mean(c)) for c in zip(*rows))
    images = cfg.sample.group_size * cfg.sample.prompts_per_step // trainer.world
    nfe = nfe_per_sample(cfg)
    result = {"config": config, "images_per_iteration": images, "sample_s": samp, "reward_s": rew,
              "reward_compute_s": compute, "update_s": upd, "iteration_s": samp + rew + upd,
              "overlap": cfg.reward.overlap, "rewards": list(cfg.reward.weights), "nfe_per_sample": nfe, "peak_memory_mb": peak_memory_mb(),
              "threads": torch.get_num_threads()}
    if trainer.acc.is_main_process:
        print(f"{config}: {images} images/iteration, {torch.get_num_threads()} threads")
        print(f"  sampling {samp:7.2f} s   reward wait {rew:6.2f} s   update {upd:7.2f} s   total {samp + rew + upd:7.2f} s"
              f"   (reward compute {compute:.2f} s, {'overlapping sampling' if cfg.reward.overlap else 'after sampling'})")
        print(f"  NFE per trained sample: sampling {nfe['sampling']}, training {nfe['training']} "
              f"({nfe['trained_steps']} trained steps), total {nfe['total']}")
        print(f"  peak memory {result['peak_memory_mb']:.0f} MB")
    return result

"""Reward hacking you can see coming: gold rewards and alarms, computed every iteration.

The trainer hands each iteration's batch and logged statistics to `HackingMonitor.observe`,
which adds

- `gold/<name>`, `gold/total`: rewards that are scored on the rollouts (every run.gold_every
  iterations) but never enter advantages: the yardstick for the optimised reward;
- `monitor/*`: the statistics the alarms watch, and `alarm/<name>` (1 when firing, else 0):
  - divergence: the optimised reward (monitor.proxy_key, reward/mean by default) rising while
    gold/total falls (least-squares slopes over a window, each in standard errors, so a noisy
    curve needs a long, steady trend to fire);
  - gold_drop: gold/total's recent mean fallen below its best window while the proxy holds
    its level (a slow hack whose slopes are too gentle for the divergence test);
  - diversity: the within-group spread of downsampled images against the base's (the first
    iterations'): a group collapsing to one picture;
  - drift/<stat>: brightness, saturation and high-frequency energy (grid artefacts, noise)
    of the batch's images, and the RMS norm of the final latents the images are decoded from,
    against the base's, in the base's per-image standard deviations;
  - amplification: the advantage amplification (adv/amplification) above a threshold.

Every process computes the same values from gathered data, so all agree on when to stop. The
monitor's memory (baselines, the recent history) is checkpointed through `state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .rewards import make_reward

MONITOR_NAME = "hacking_monitor"  # its part of a checkpoint: reward_hacking_monitor.safetensors
FEATURE_SIZE = 8  # images are compared as FEATURE_SIZE x FEATURE_SIZE RGB thumbnails
# the drifting statistics, with what each measures (for the alarm messages)
DRIFT_STATS = {"brightness": "mean luminance", "saturation": "mean saturation",
               "high_freq": "share of spectral energy above half Nyquist",
               "latent_norm": "RMS of the final latents"}


@dataclass
class Alarm:
    name: str
    message: str  # what it saw: the statistic, its value, the threshold
    first: bool = False  # the first time this alarm fires in the run (its message is printed then)


# ---- statistics ------------------------------------------------------------------------------
def slope_t(values) -> tuple[float, float]:
    """(slope, slope / its standard error) of the least-squares line through `values` at
    0, 1, 2, ...; t is 0 when the points fit the line exactly with zero slope."""
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    sxx = float((x * x).sum())
    slope = float((x * (y - y.mean())).sum() / sxx)
    resid = y - y.mean() - slope * x
    se = float(np.sqrt((resid * resid).sum() / (n - 2) / sxx)) if n > 2 else float("inf")
    if se == 0:
        return slope, (0.0 if slope == 0 else float(np.sign(slope)) * float("inf"))
    return slope, slope / se


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(B, FEATURE_SIZE^2 * 3) floats in [0, 1]: area-averaged thumbnails, blind to the fine
    detail two good samples of one prompt differ in less than two different compositions."""
    b, h, w, _ = images.shape
    f = FEATURE_SIZE
    if h % f or w % f:  # crop to a multiple: the thumbnail of the bulk of the image is enough
        images = images[:, : h - h % f, : w - w % f]
        h, w = images.shape[1:3]
    x = images.reshape(b, f, h // f, f, w // f, 3).astype(np.float64).mean(axis=(2, 4)) / 255.0
    return x.reshape(b, -1)


def image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image statistics that hacked rewards are known to push: mean brightness (luminance
    in [0, 1]), mean saturation ((max - min) / max over RGB) and high-frequency energy (the share
    of the luminance spectrum's energy, mean removed, above half the Nyquist frequency in either
    axis: checkerboard and grid artefacts and leftover noise live there)."""
    x = images.astype(np.float64) / 255.0
    lum = x @ np.array([0.299, 0.587, 0.114])
    mx, mn = x.max(-1), x.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)
    spec = np.abs(np.fft.fft2(lum - lum.mean(axis=(1, 2), keepdims=True))) ** 2
    fy = np.abs(np.fft.fftfreq(lum.shape[1]))[:, None]
    fx = np.abs(np.fft.fftfreq(lum.shape[2]))[None, :]
    high = (fy > 0.25) | (fx > 0.25)
    total = spec.sum(axis=(1, 2))
    hf = np.where(total > 0, (spec * high).sum(axis=(1, 2)) / np.maximum(total, 1e-12), 0.0)
    return {"brightness": lum.mean(axis=(1, 2)), "saturation": sat.mean(axis=(1, 2)), "high_freq": hf}


def latent_norms(latents: torch.Tensor) -> torch.Tensor:
    """(B,) float64 on the CPU: the RMS over all entries of each trajectory's final state
    (`latents` is (B, N + 1, *latent)), the sample the images are decoded from (or, when they
    decode the last clean prediction, that plus the last step's noise). A policy pushed off the
    data manifold (saturated, high-contrast images) grows it before pixels clip; computed on the
    latents' device, so only B numbers leave it."""
    final = latents[:, -1].flatten(1).float()
    return final.pow(2).mean(1).sqrt().cpu().double()


def group_spread(features: np.ndarray, group_ids: np.ndarray) -> float:
    """Mean over groups of the root mean squared distance of a group's images to their centroid."""
    spreads = []
    for g in np.unique(group_ids):
        f = features[group_ids == g]
        if len(f) > 1:
            spreads.append(float(np.sqrt(((f - f.mean(0)) ** 2).sum(1).mean())))
    return float(np.mean(spreads)) if spreads else 0.0


@torch.no_grad()
def base_distance(velocity, batch, images: int, acc) -> float:
    """monitor/base_kl: mean over the first `images` local rollouts and every sampler step of
    mean_CHW (v(x_k) - v_base(x_k))^2 at the rollout's own states: the velocity-space KL
    surrogate the KL penalties use, measured whatever their weight, so a run can be read against
    how far it has moved from the base. Averaged over processes (each runs the same forwards)."""
    from .models.base import index_condition

    k = min(images, len(batch.latents))
    idx = torch.arange(k)
    cond = index_condition(batch.cond, idx)
    total = 0.0
    steps = batch.latents.shape[1] - 1
    for j in range(steps):
        x = batch.latents[:k, j].to(acc.device, torch.float32)
        gap = velocity(x, batch.sigmas[j], cond).float() - velocity(x, batch.sigmas[j], cond, reference=True).float()
        total += float(gap.pow(2).mean())
    value = torch.tensor([total / max(steps, 1)], device=acc.device)
    return float(acc.reduce(value, "mean")) if acc.num_processes > 1 else float(value)


# ---- gold rewards --------------------------------------------------------------------------
def score_rewards(rewards: dict, batch, acc) -> dict[str, torch.Tensor]:
    """{name: scores of the whole gathered batch}: a pointwise reward scores each process's own
    images and the scores are gathered; a group reward (win rates) is run once on the main
    process over all images, and its scores broadcast."""
    from accelerate.utils import broadcast_object_list, gather_object

    world = acc.num_processes
    out: dict[str, torch.Tensor] = {}
    for name, reward in rewards.items():
        if reward.needs_groups and world > 1:
            imgs = gather_object([batch.images])
            prompts, meta = gather_object([batch.prompts]), gather_object([batch.metadata])
            ids = acc.gather(batch.group_ids.to(acc.device)).cpu().numpy()
            payload = [None]
            if acc.is_main_process:
                payload = [np.asarray(reward(np.concatenate(imgs), sum(prompts, []), sum(meta, []), ids).scores)]
            out[name] = torch.as_tensor(broadcast_object_list(payload)[0], dtype=torch.float64)
        else:
            res = reward(batch.images, batch.prompts, batch.metadata, batch.group_ids.numpy())
            scores = torch.as_tensor(np.asarray(res.scores), dtype=torch.float64, device=acc.device)
            out[name] = acc.gather(scores).cpu() if world > 1 else scores.cpu()
    return out


class HackingMonitor:
    """Gold scoring and the alarms; `observe` once per iteration on every process."""

    def __init__(self, cfg, acc):
        self.cfg, self.acc = cfg, acc
        r = cfg.reward
        args = {**r.args, **r.gold_args}
        self.gold_weights = dict(r.gold)
        # built apart from the trained rewards: a gold reward never shares state with what is optimised
        self.gold = {name: make_reward(name, **dict(args.get(name, {}))) for name in self.gold_weights}
        self.steps: list[float] = []  # iterations with a gold score, and the two curves there
        self.proxy: list[float] = []
        self.gold_total: list[float] = []
        self.recent: dict[str, list[float]] = {}  # the last `smooth` values of each smoothed statistic
        self.base: dict[str, list[float]] = {}  # the first iterations' values, averaged into baselines
        self.fired: set[str] = set()  # alarms that fired at least once (messages are printed once each)
        self.streak = 0  # consecutive iterations, up to this one, on which some alarm fired

    # ---- the per-iteration entry point -------------------------------------------------------
    def observe(self, batch, stats: dict, iteration: int) -> list[Alarm]:
        """Add gold/*, monitor/* and alarm/* to `stats`; return the alarms firing now."""
        m = self.cfg.monitor
        if self.gold and iteration % self.cfg.run.gold_every == 0:
            self._score_gold(batch, stats, iteration)
        if not m.enabled:
            return []
        alarms = []
        alarms += self._divergence(stats)
        alarms += self._gold_drop(stats)
        alarms += self._images(batch, stats)
        alarms += self._amplification(stats)
        for a in alarms:
            a.first = a.name not in self.fired
            self.fired.add(a.name)
        self.streak = self.streak + 1 if alarms else 0
        stats["monitor/alarm_streak"] = float(self.streak)
        return alarms

    def should_stop(self) -> bool:
        """run.stop_on_alarm ends the run once alarms have fired on monitor.stop_after consecutive iterations."""
        return self.cfg.run.stop_on_alarm and self.streak >= self.cfg.monitor.stop_after

    def _score_gold(self, batch, stats: dict, iteration: int) -> None:
        scores = score_rewards(self.gold, batch, self.acc)
        total = sum(self.gold_weights[n] * s for n, s in scores.items())
        for n, s in scores.items():
            stats[f"gold/{n}"] = float(s.mean())
        stats["gold/total"] = float(total.mean())
        self.steps.append(float(iteration))
        self.proxy.append(float(stats[self.cfg.monitor.proxy_key]))
        self.gold_total.append(stats["gold/total"])

    # ---- the alarms --------------------------------------------------------------------------
    def _divergence(self, stats: dict) -> list[Alarm]:
        m = self.cfg.monitor
        if len(self.gold_total) < m.window or "gold/total" not in stats:
            return []
        _, t_proxy = slope_t(self.proxy[-m.window:])
        _, t_gold = slope_t(self.gold_total[-m.window:])
        stats["monitor/divergence/proxy_t"], stats["monitor/divergence/gold_t"] = t_proxy, t_gold
        firing = t_proxy > m.divergence_z and t_gold < -m.divergence_z
        stats["alarm/divergence"] = float(firing)
        if not firing:
            return []
        return [Alarm("divergence", f"divergence: over the last {m.window} gold scorings {m.proxy_key} rose at "
                                    f"{t_proxy:+.1f} SE and gold/total fell at {t_gold:+.1f} SE "
                                    f"(threshold +-{m.divergence_z:g} SE)")]

    def _gold_drop(self, stats: dict) -> list[Alarm]:
        """Gold's mean over the last `gold_window` scorings is `gold_drop` (plus 2 SE) below its best
        such window while the proxy's mean is at least what it was then: the slow hack the slope
        test misses; a dip the proxy shares (a bad stretch of prompts) does not fire."""
        m = self.cfg.monitor
        w = m.gold_window
        if not m.gold_drop or len(self.gold_total) < w or "gold/total" not in stats:
            return []
        gold, proxy = np.asarray(self.gold_total), np.asarray(self.proxy)
        means = np.convolve(gold, np.ones(w) / w, mode="valid")  # means[i]: the window ending at scoring i + w - 1
        best = int(np.argmax(means))
        drop = float(means[best] - means[-1])
        se = float(np.sqrt((gold[best:best + w].var(ddof=1) + gold[-w:].var(ddof=1)) / w))
        proxy_held = proxy[-w:].mean() >= proxy[best:best + w].mean()
        stats["monitor/gold_drop"] = drop
        threshold = m.gold_drop + m.gold_drop_z * se  # the best window is a maximum: its noise is added, not compared
        firing = drop > threshold and proxy_held
        stats["alarm/gold_drop"] = float(firing)
        if not firing:
            return []
        return [Alarm("gold_drop", f"gold_drop: gold/total's mean over the last {w} scorings is {drop:.3f} below its "
                                   f"best ({means[best]:.3f}; threshold {threshold:.3f}) "
                                   f"while {m.proxy_key} is at or above its level then")]

    def _smoothed(self, key: str, value: float) -> tuple[float, float | None]:
        """(mean of the last `smooth` values, the baseline or None while it is being measured):
        the baseline is the mean of the first `base_iterations` values the monitor saw (the base
        model's rollouts on a fresh run)."""
        m = self.cfg.monitor
        hist = self.recent.setdefault(key, [])
        hist.append(value)
        del hist[:-m.smooth]
        base = self.base.setdefault(key, [])
        if len(base) < m.base_iterations:
            base.append(value)
            return float(np.mean(hist)), None
        return float(np.mean(hist)), float(np.mean(base))

    def _images(self, batch, stats: dict) -> list[Alarm]:
        m = self.cfg.monitor
        feats = torch.as_tensor(thumbnails(batch.images))
        st = {**image_stats(batch.images), "latent_norm": latent_norms(batch.latents)}
        local = torch.cat([feats, torch.stack([torch.as_tensor(st[k]) for k in DRIFT_STATS], 1),
                           batch.group_ids[:, None].double()], 1)
        if self.acc.num_processes > 1:
            local = self.acc.gather(local.to(self.acc.device)).cpu()
        local = local.numpy()
        feats, per_image, ids = local[:, :feats.shape[1]], local[:, feats.shape[1]:-1], local[:, -1]
        alarms = []
        spread = group_spread(feats, ids)
        stats["monitor/diversity/spread"] = spread
        now, base = self._smoothed("diversity", spread)
        if base is not None and base > 0:
            ratio = now / base
            stats["monitor/diversity/ratio"] = ratio
            stats["alarm/diversity"] = float(ratio < m.diversity_ratio)
            if ratio < m.diversity_ratio:
                alarms.append(Alarm("diversity", f"diversity collapse: within-group spread of {FEATURE_SIZE}x"
                                                 f"{FEATURE_SIZE} thumbnails is {ratio:.2f} of the base's "
                                                 f"(threshold {m.diversity_ratio:g})"))
        for j, name in enumerate(DRIFT_STATS):
            col = per_image[:, j]
            stats[f"monitor/drift/{name}"] = float(col.mean())
            now, base = self._smoothed(name, float(col.mean()))
            _, base_sd = self._smoothed(f"{name}_sd", float(col.std()))
            if base is None or not base_sd:
                continue
            z = (now - base) / base_sd
            stats[f"monitor/drift/{name}_sd"] = z
            stats[f"alarm/drift/{name}"] = float(abs(z) > m.drift_sd)
            if abs(z) > m.drift_sd:
                alarms.append(Alarm(f"drift/{name}", f"{name} drift ({DRIFT_STATS[name]}): batch mean {now:.3f} "
                                                     f"vs the base's {base:.3f}, {z:+.2f} base SDs "
                                                     f"(threshold {m.drift_sd:g})"))
        return alarms

    def _amplification(self, stats: dict) -> list[Alarm]:
        m = self.cfg.monitor
        values = {k: v for k, v in stats.items() if k.startswith("adv/") and k.endswith("amplification")}
        if not m.amplification_max or not values:
            return []
        key, value = max(values.items(), key=lambda kv: kv[1])
        hist = self.recent.setdefault("amplification", [])
        hist.append(value)
        del hist[:-m.smooth]
        now = float(np.mean(hist))
        stats["monitor/amplification"] = now
        stats["alarm/amplification"] = float(now > m.amplification_max)
        if now <= m.amplification_max:
            return []
        return [Alarm("amplification", f"advantage amplification: {key} {now:.1f} (mean of the last {len(hist)} "
                                       f"iterations; threshold {m.amplification_max:g})")]

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"steps": torch.tensor(self.steps, dtype=torch.float64),
                 "proxy": torch.tensor(self.proxy, dtype=torch.float64),
                 "gold_total": torch.tensor(self.gold_total, dtype=torch.float64),
                 "streak": torch.tensor(self.streak, dtype=torch.int64),
                 "fired": torch.tensor([sorted(ALARM_NAMES).index(n) for n in sorted(self.fired)
                                        if n in ALARM_NAMES], dtype=torch.int64)}
        for k, v in self.base.items():
            state[f"base.{k}"] = torch.tensor(v, dtype=torch.float64)
        for k, v in self.recent.items():
            state[f"recent.{k}"] = torch.tensor(v, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = state["steps"].tolist() if "steps" in state else []
        self.proxy = state["proxy"].tolist() if "proxy" in state else []
        self.gold_total = state["gold_total"].tolist() if "gold_total" in state else []
        self.streak = int(state["streak"]) if "streak" in state else 0
        self.fired = {sorted(ALARM_NAMES)[i] for i in state.get("fired", torch.zeros(0, dtype=torch.int64)).tolist()}
        self.base = {k[5:]: v.tolist() for k, v in state.items() if k.startswith("base.")}
        self.recent = {k[7:]: v.tolist() for k, v in state.items() if k.startswith("recent.")}


ALARM_NAMES = ("divergence", "diversity", "amplification", *(f"drift/{s}" for s in DRIFT_STATS), "gold_drop")

"""Rewards scored while sampling goes on.

Each sampling batch's images go to the rewards as soon as they are decoded; the trainer
waits, when sampling ends, only for what is still running. One `RewardRound` per iteration
and process:

- `add(positions, images, prompts, metadata)` after each decoded sampling batch. A pointwise
  reward gets the batch as one call. A reward that needs groups gets one call per prompt
  group, made as soon as the group's last image is decoded, when the group lies wholly on
  this process (it does whenever group_size divides the per-process batch).
- `collect(acc)` waits, has the main process judge the groups that straddle processes (only
  their images are gathered), and gathers scores, so that every process ends with the
  iteration's scores in global order.

With `overlap` the calls run in worker threads, one pool per reward, so different rewards
run at once; a reward's own calls run one at a time and in order unless it declares
`concurrent_calls > 1`. Without it the very same calls (same inputs, same order per reward)
run on the calling thread inside `collect`, one reward after another: the scores are
identical bit for bit. A group reward's call covers one group, so its scores do not depend on
which process judges it. A call that raises fails the iteration with its own exception: at
the next `add` once it is known, else in `collect`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from .base import Reward, RewardOutput, merge_info


def _timed_call(reward: Reward, images, prompts, metadata, group_ids) -> tuple[RewardOutput, float]:
    start = time.perf_counter()
    # worker threads start with gradients on; a reward's scores never need them
    with torch.no_grad():
        out = reward(images, prompts, metadata, group_ids)
    return out, time.perf_counter() - start


@dataclass
class _Call:
    index: np.ndarray  # the images' global indices
    run: partial  # the call itself; runs in collect() when nothing runs in the background
    future: Future | None = None

    def result(self) -> tuple[RewardOutput, float]:
        return self.future.result() if self.future is not None else self.run()


@dataclass
class ScoredReward:
    """One reward's scores for the iteration's global batch, on every process."""

    scores: torch.Tensor  # float64 (global batch,)
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 (global batch,) each
    info: dict[str, float] = field(default_factory=dict)


class RewardPipeline:
    """The trainer's rewards and, with `overlap`, a pool of worker threads for each."""

    def __init__(self, rewards: dict[str, Reward], overlap: bool = True):
        self.rewards = rewards
        self.pools = ({name: ThreadPoolExecutor(max(1, int(r.concurrent_calls)), thread_name_prefix=f"reward-{name}")
                       for name, r in rewards.items()} if overlap else None)

    def begin(self, global_index, group_ids, group_size: int) -> RewardRound:
        return RewardRound(self, np.asarray(global_index), np.asarray(group_ids), group_size)


class RewardRound:
    """One iteration's reward calls on this process (module docstring)."""

    def __init__(self, pipeline: RewardPipeline, global_index: np.ndarray, group_ids: np.ndarray, group_size: int):
        self.rewards, self.pools = pipeline.rewards, pipeline.pools
        self.global_index, self.group_ids = global_index, group_ids
        n = len(global_index)
        # a process's contiguous slice holds whole groups exactly when group_size divides it, on every process
        self.straddles = n % group_size != 0
        ids, counts = np.unique(group_ids, return_counts=True)
        self.local_groups = ids[counts == group_size]  # wholly on this process
        self.pending_groups = [int(g) for g in self.local_groups]
        self.images: np.ndarray | None = None
        self.prompts: list = [None] * n
        self.metadata: list = [None] * n
        self.decoded = np.zeros(n, dtype=bool)
        self.calls: dict[str, list[_Call]] = {name: [] for name in self.rewards}
        self.wait_seconds = 0.0  # spent in collect(): the reward time sampling did not hide
        self.compute_seconds = 0.0  # spent inside this process's reward calls, summed over calls

    # ---- while sampling ------------------------------------------------------------------
    def add(self, positions: slice, images: np.ndarray, prompts: list[str], metadata: list) -> None:
        """A decoded sampling batch: `positions` in this process's batch."""
        pos = np.arange(len(self.global_index))[positions]
        if self.images is None:
            self.images = np.empty((len(self.global_index), *images.shape[1:]), dtype=images.dtype)
        self.images[pos] = images
        for p, prompt, meta in zip(pos.tolist(), prompts, metadata):
            self.prompts[p], self.metadata[p] = prompt, meta
        self.decoded[pos] = True
        complete = [g for g in self.pending_groups if self.decoded[self.group_ids == g].all()]
        self.pending_groups = [g for g in self.pending_groups if g not in complete]
        for name, reward in self.rewards.items():
            if not reward.needs_groups:
                self._submit(name, pos, self.images[pos], [self.prompts[p] for p in pos],
                             [self.metadata[p] for p in pos], self.group_ids[pos])
                continue
            for g in complete:
                members = np.flatnonzero(self.group_ids == g)
                self._submit(name, members, self.images[members], [self.prompts[p] for p in members],
                             [self.metadata[p] for p in members], self.group_ids[members])
        self._raise_first_failure()

    def _submit(self, name: str, positions: np.ndarray, images, prompts, metadata, group_ids,
                index: np.ndarray | None = None) -> None:
        run = partial(_timed_call, self.rewards[name], images, prompts, metadata, group_ids)
        call = _Call(self.global_index[positions] if index is None else index, run)
        if self.pools is not None:
            call.future = self.pools[name].submit(run)
        self.calls[name].append(call)

    def _raise_first_failure(self) -> None:
        for calls in self.calls.values():
            for call in calls:
                if call.future is not None and call.future.done() and call.future.exception() is not None:
                    self.cancel()
                    raise call.future.exception()

    def cancel(self) -> None:
        for calls in self.calls.values():
            for call in calls:
                if call.future is not None:
                    call.future.cancel()

    # ---- after sampling ------------------------------------------------------------------
    def collect(self, acc) -> dict[str, ScoredReward]:
        """Wait for every call, judge straddling groups on the main process, gather scores."""
        start = time.perf_counter()
        try:
            results = self._results(acc)
        except BaseException:
            self.cancel()
            raise
        self.wait_seconds = time.perf_counter() - start
        return results

    def _results(self, acc) -> dict[str, ScoredReward]:
        group_rewards = [n for n, r in self.rewards.items() if r.needs_groups]
        if group_rewards and self.straddles and acc.num_processes > 1:
            self._submit_straddling(acc, group_rewards)
        out = {}
        for name, reward in self.rewards.items():
            done = []
            for call in self.calls[name]:
                res, seconds = call.result()
                self.compute_seconds += seconds
                done.append((call.index, res))
            gather = _gather_groups if reward.needs_groups else _gather_pointwise
            out[name] = gather(reward, done, acc, acc.num_processes * len(self.global_index))
        return out

    def _submit_straddling(self, acc, names: list[str]) -> None:
        """Gather the images of groups that straddle processes to the main process, which judges them."""
        from accelerate.utils import gather_object

        mine = np.flatnonzero(~np.isin(self.group_ids, self.local_groups))
        part = (self.global_index[mine], self.images[mine], [self.prompts[p] for p in mine],
                [self.metadata[p] for p in mine], self.group_ids[mine])
        parts = gather_object([part])
        if not acc.is_main_process:
            return
        order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
        index = np.concatenate([p[0] for p in parts])[order]
        images = np.concatenate([p[1] for p in parts])[order]
        gids = np.concatenate([p[4] for p in parts])[order]
        prompts = [x for p in parts for x in p[2]]
        metadata = [x for p in parts for x in p[3]]
        for g in dict.fromkeys(gids.tolist()):
            m = np.flatnonzero(gids == g)
            for name in names:
                self._submit(name, m, images[m], [prompts[order[i]] for i in m], [metadata[order[i]] for i in m],
                             gids[m], index=index[m])


def _as_float64(values, n: int | None = None) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1) if values is not None else np.full(n, np.nan)


def _gather_pointwise(reward: Reward, done: list, acc, total: int) -> ScoredReward:
    """This process's calls in index order, gathered over processes (contiguous slices)."""
    index = np.concatenate([i for i, _ in done])
    order = np.argsort(index, kind="stable")
    scores = np.concatenate([_as_float64(o.scores) for _, o in done])[order]
    keys = dict.fromkeys(k for _, o in done for k in o.components)
    comps = {k: np.concatenate([_as_float64(o.components.get(k), len(i)) for i, o in done])[order] for k in keys}

    def gather(values: np.ndarray) -> torch.Tensor:
        return acc.gather(torch.as_tensor(values, dtype=torch.float64, device=acc.device)).cpu()

    return ScoredReward(gather(scores), {k: gather(v) for k, v in comps.items()},
                        merge_info(reward, [(len(i), o.info) for i, o in done]))


def _gather_groups(reward: Reward, done: list, acc, total: int) -> ScoredReward:
    """Every process's group calls (and the main process's straddling ones), placed by index."""
    from accelerate.utils import gather_object

    entries = [(i, _as_float64(o.scores), {k: _as_float64(v) for k, v in o.components.items()}, o.info)
               for i, o in done]
    if acc.num_processes > 1:
        entries = gather_object(entries)
    entries.sort(key=lambda e: int(e[0].min()))  # group order, whichever process judged the group
    scores = np.full(total, np.nan)
    comps: dict[str, np.ndarray] = {}
    for index, s, c, _ in entries:
        scores[index] = s
        for k, v in c.items():
            comps.setdefault(k, np.full(total, np.nan))[index] = v
    return ScoredReward(torch.as_tensor(scores, dtype=torch.float64),
                        {k: torch.as_tensor(v, dtype=torch.float64) for k, v in comps.items()},
                        merge_info(reward, [(len(e[0]), e[3]) for e in entries]))

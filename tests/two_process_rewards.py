"""Run under torchrun by test_reward_overlap.py: one iteration's advantages with each process
judging its own groups, then with every group gathered to and judged on the main process."""

import json
import sys

import numpy as np
from accelerate.utils import gather_object

from flowgrpo.config import load_config
from flowgrpo.train_config import TrainConfig, validate
from flowgrpo.trainer import Trainer

cfg = validate(load_config(TrainConfig, sys.argv[1], []))
trainer = Trainer(cfg)
batch = trainer.sample(0)
calls = len(batch.reward_round.calls["pref_winrate"])
trainer.score(batch)
per_rank = batch.all_advantages.tolist()

# the same images, every group treated as straddling processes
gathered_round = trainer.reward_pipeline.begin(batch.global_index.numpy(), batch.group_ids.numpy(),
                                               cfg.sample.group_size)
gathered_round.local_groups, gathered_round.pending_groups, gathered_round.straddles = np.zeros(0, int), [], True
gathered_round.add(slice(None), batch.images, batch.prompts, batch.metadata)
batch.reward_round = gathered_round
trainer.score(batch)
counts = gather_object([calls])
if trainer.acc.is_main_process:
    with open(sys.argv[2], "w") as f:
        json.dump({"group_calls_per_rank": counts, "per_rank": per_rank, "gathered": batch.all_advantages.tolist()}, f)

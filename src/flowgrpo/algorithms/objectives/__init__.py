"""Training objectives, one module each behind one interface (base.Objective), chosen by
`optim.policy_loss` through OBJECTIVES. docs/objectives.md gives each one's formula.

    ratio            Flow-GRPO's clipped SDE-ratio loss (+ KL)          ratio.py
    awm              Advantage Weighted Matching                         awm.py
    nft              DiffusionNFT (old policy, bounded implicit loss)    nft.py
    dgpo             DGPO (group-level DPO on the denoising loss)       dgpo.py
    reward_filtered  flow matching on the best rollouts (RAFT-style)    reward_filtered.py
    supervised       flow matching on renderer targets (calibration)     supervised.py
"""

from __future__ import annotations

from .awm import AWMObjective
from .dgpo import DGPOObjective
from .base import ForwardObjective, Objective, Services, derived_generator, swapped_in
from .nft import NFTObjective
from .ratio import RatioObjective
from .reward_filtered import RewardFilteredObjective
from .supervised import SupervisedObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "ratio": RatioObjective,
    "awm": AWMObjective,
    "nft": NFTObjective,
    "dgpo": DGPOObjective,
    "reward_filtered": RewardFilteredObjective,
    "supervised": SupervisedObjective,
}
CHECKPOINT_NAME = "objective"  # its state is saved as the reward-state file of this name


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"optim.policy_loss must be one of {', '.join(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


__all__ = ["CHECKPOINT_NAME", "OBJECTIVES", "ForwardObjective", "Objective", "Services", "derived_generator",
           "objective_class", "swapped_in"]

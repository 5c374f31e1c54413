"""The learned proxy of the shapes verifier (worlds/shapes/proxy.py) as a reward: pointwise
(`shapes_proxy`, its predicted partial credit) and as a pairwise judge (`shapes_proxy`, win
probabilities sigmoid((s_a - s_b) / tau) from the same network's scores)."""

from __future__ import annotations

import numpy as np

from ..worlds.shapes.grammar import parse_prompt
from .base import Reward, RewardError, RewardOutput, as_uint8_images, register
from .pairwise import BradleyTerryJudge, register_judge


class ShapesProxyReward(Reward):
    kind = "pointwise"
    name = "shapes_proxy"

    def __init__(self, path: str | None = None):
        from ..worlds.shapes.proxy import load_proxy

        if not path:
            raise RewardError("shapes_proxy needs path=FOLDER (reward.args: {shapes_proxy: {path: ...}}); train one "
                              "with `flowgrpo make-proxy --out FOLDER`")
        self.net, self.meta = load_proxy(path)

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        from ..worlds.shapes.proxy import predict

        images = as_uint8_images(images)
        records = [m if m and "include" in m else parse_prompt(p)
                   for p, m in zip(prompts, metadata or [None] * len(prompts))]
        return RewardOutput(np.asarray(predict(self.net, images, records), dtype=np.float64))


@register("shapes_proxy")
def _proxy(**kw):
    return ShapesProxyReward(**kw)


@register_judge("shapes_proxy")
def _proxy_judge(path: str | None = None, tau: float = 0.05, sample: bool = False, seed: int = 0):
    judge = BradleyTerryJudge(ShapesProxyReward(path), tau=tau, sample=sample, seed=seed)
    judge.name = "shapes_proxy"
    return judge

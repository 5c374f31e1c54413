"""JPEG (in)compressibility: the size of the image saved as JPEG quality 95 (DDPO's toy reward)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .base import Reward, RewardOutput, as_uint8_images, register


def jpeg_kilobytes(images) -> np.ndarray:
    sizes = []
    for img in as_uint8_images(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000.0)
    return np.asarray(sizes)


class JpegReward(Reward):
    """`compressibility` = -kB / 500 (smaller files score higher); `incompressibility` = +kB / 500."""

    def __init__(self, sign: float):
        self.sign = sign
        self.name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"

    def __call__(self, images, prompts, metadata=None, group_ids=None) -> RewardOutput:
        kb = jpeg_kilobytes(images)
        return RewardOutput(self.sign * kb / 500.0, {"jpeg_kb": kb})


@register("jpeg_compressibility")
def _compress():
    return JpegReward(-1.0)


@register("jpeg_incompressibility")
def _incompress():
    return JpegReward(+1.0)

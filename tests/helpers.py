"""Deterministic test inputs."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

TINY_BUDGET = dict(min_pixels=64 * 28 * 28, max_pixels=144 * 28 * 28)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 3, height // 3, width // 2, height // 2], fill=(255, 0, 0))
    return img

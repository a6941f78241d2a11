"""Draw the RoI heat map and box over the original image (for `qzoom answer --overlay` and benchmarks)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["draw_overlay"]


def draw_overlay(image: Image.Image, roi_map, roi_box, alpha: float = 0.45) -> Image.Image:
    """`roi_map`: rows of probabilities over the merged token grid (or None); `roi_box`: original pixels."""
    base = image.convert("RGB")
    if roi_map is not None:
        heat = np.clip(np.asarray(roi_map, dtype=np.float32), 0.0, 1.0)
        # Nearest upsampling keeps the token grid visible: each cell is one merged token of the input.
        heat_img = Image.fromarray((heat * 255).astype(np.uint8), mode="L").resize(base.size, Image.Resampling.NEAREST)
        red = Image.new("RGB", base.size, (255, 32, 0))
        mask = heat_img.point(lambda v: int(v * alpha))
        base = Image.composite(red, base, mask)
    if roi_box is not None:
        draw = ImageDraw.Draw(base)
        width = max(2, round(min(base.size) / 200))
        x1, y1, x2, y2 = roi_box
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(0, 255, 0), width=width)
    return base

"""Coordinate spaces of the service, in plain Python (no numpy, no PIL).

Boxes are [x1, y1, x2, y2], origin top-left, pixel boxes end-exclusive. Spaces: `original` (pixels of
the original image), `input` (pixels of the model-input image: Qwen2.5-VL's resize at the server's default
coarse budget), `norm1000` (0-1000 per axis, as Qwen3-VL emits), `norm1` (0-1 per axis).

The one home of these conversions: the server imports this module too.
"""

from __future__ import annotations

import math

__all__ = ["SPACES", "smart_resize", "preresize_bounds", "input_size_for", "to_original", "from_original",
           "all_spaces"]

SPACES = ("original", "input", "norm1000", "norm1")
_FACTOR = 28  # pixels per merged visual token side (14 px patches, 2x2 merge)


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = _FACTOR):
    """(height, width) rounded to multiples of `factor` with area in [min_pixels, max_pixels]."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def input_size_for(width: int, height: int, min_pixels: int = 256 * 784, max_pixels: int = 576 * 784,
                   factor: int = _FACTOR):
    """(width, height) of the model-input image the server derives from an original of this size.

    Two resizes, as the server does: a pre-resize to multiples of `factor` (4..16384 tokens), then the
    budget. `factor`: pixels per merged token side, the model's patch size times its merge size.
    """
    h, w = smart_resize(height, width, *preresize_bounds(factor), factor)
    h, w = smart_resize(h, w, min_pixels, max_pixels, factor)
    return w, h


def preresize_bounds(factor: int = _FACTOR) -> tuple[int, int]:
    """Pixel bounds of the qwen-vl-utils pre-resize: 4 to 16384 merged tokens of `factor` x `factor` px."""
    return 4 * factor * factor, 16384 * factor * factor


def _scale(space: str, original_size, input_size) -> tuple[float, float]:
    w0, h0 = original_size
    if space == "original":
        return 1.0, 1.0
    if space == "input":
        if input_size is None:
            raise ValueError("the input space needs the model-input size (see input_size_for)")
        return input_size[0] / w0, input_size[1] / h0
    if space == "norm1000":
        return 1000.0 / w0, 1000.0 / h0
    if space == "norm1":
        return 1.0 / w0, 1.0 / h0
    raise ValueError(f"unknown coordinate space {space!r}; use one of {', '.join(SPACES)}")


def to_original(box, space: str, original_size, input_size=None) -> list[float]:
    sx, sy = _scale(space, original_size, input_size)
    x1, y1, x2, y2 = box
    return [x1 / sx, y1 / sy, x2 / sx, y2 / sy]


def from_original(box, space: str, original_size, input_size=None) -> list[float]:
    sx, sy = _scale(space, original_size, input_size)
    x1, y1, x2, y2 = box
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def all_spaces(box, original_size, input_size) -> dict[str, list[float]]:
    return {space: from_original(box, space, original_size, input_size) for space in SPACES}

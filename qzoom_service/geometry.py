"""Crop boxes: validating a requested box and fitting it to what can be cropped and encoded.

Boxes are (x1, y1, x2, y2) in pixels of the original image, end exclusive. Conversions between coordinate
spaces live in `qzoom_client.coords`, shared with the client.
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidInput

__all__ = ["grow_to_min_side", "validate_box", "fit_crop_box", "MAX_ASPECT_RATIO"]

MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's image processor refuses longer/thinner images


def validate_box(box, where: str = "") -> tuple[float, float, float, float]:
    """Reject boxes that are not four finite numbers with x1 < x2 and y1 < y2.

    `where`: what the box is when it is not the caller's own numbers (e.g. " once converted to original
    pixels": a huge finite coordinate may overflow there)."""
    if len(box) != 4:
        raise InvalidInput(f"a box has 4 numbers (x1, y1, x2, y2); got {len(box)}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InvalidInput(f"box coordinates must be numbers; got {list(box)!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise InvalidInput(f"box coordinates must be finite{where}; got {[x1, y1, x2, y2]}")
    if x2 <= x1 or y2 <= y1:
        raise InvalidInput(f"box is empty or inverted{where}: need x1 < x2 and y1 < y2; got {[x1, y1, x2, y2]}")
    return x1, y1, x2, y2


def grow_to_min_side(x1, y1, x2, y2, width: int, height: int, *, min_side: int) -> tuple[int, int, int, int]:
    """Grow a side shorter than `min_side` symmetrically, slide it back inside the image, clamp, truncate.

    `min_side` is one merged token of the model input (the model's `factor`, 28 px on Qwen2.5-VL).

    Float32 arithmetic in the reference's order of operations (`get_bbox4src`), so boxes are bit-identical;
    truncation may therefore end a box up to 1 px short of a cell edge that falls on x.9999. One deliberate
    difference: where that truncation leaves a grown side at 27 px (the reference then skips the zoom
    because the crop is under 28 px), the side is widened to 28 px inside the image.
    """
    box = torch.tensor([x1, y1, x2, y2], dtype=torch.float32)
    for lo, hi, limit in ((0, 2, width), (1, 3, height)):
        grow = torch.clamp(min_side - (box[hi] - box[lo]), min=0)
        box[lo] -= grow / 2
        box[hi] += grow / 2
    for lo, hi in ((0, 2), (1, 3)):  # slide right / down
        shift = -box[lo].clamp(max=0)
        box[lo] += shift
        box[hi] += shift
    for lo, hi, limit in ((0, 2, width), (1, 3, height)):  # slide left / up
        shift = (box[hi] - limit).clamp(min=0)
        box[lo] -= shift
        box[hi] -= shift
    box[0::2] = box[0::2].clamp(0, width)
    box[1::2] = box[1::2].clamp(0, height)
    x1, y1, x2, y2 = box.long().tolist()
    x1, x2 = _at_least(x1, x2, width, min_side)
    y1, y2 = _at_least(y1, y2, height, min_side)
    return x1, y1, x2, y2


def _at_least(lo: int, hi: int, limit: int, min_side: int) -> tuple[int, int]:
    if hi - lo >= min_side or limit < min_side:
        return lo, hi
    hi = min(limit, lo + min_side)
    return hi - min_side, hi


def fit_crop_box(box, size, *, min_side: int, max_aspect: float = MAX_ASPECT_RATIO):
    """An explicit zoom box (original pixels, floats) -> the int box actually cropped.

    Clamped to the image; a side shorter than `min_side` grows around its centre (sliding back inside the
    image); an aspect ratio beyond `max_aspect` is refused. Messages say what to send instead, since agents
    feed them back to the model.
    """
    w0, h0 = size
    box = validate_box(box, " in original pixels")  # int()/round() of inf would raise OverflowError
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(w0, round(box[2])), min(h0, round(box[3]))
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise InvalidInput(
            f"box {[round(v, 2) for v in box]} lies outside the {w0}x{h0} image; send x1 < x2 <= {w0} and "
            f"y1 < y2 <= {h0} in original pixels (or use norm1000 / norm1 coordinates)"
        )
    x1, y1, x2, y2 = grow_to_min_side(x1, y1, x2, y2, w0, h0, min_side=min_side)
    ratio = max(x2 - x1, y2 - y1) / min(x2 - x1, y2 - y1)
    if ratio > max_aspect:
        raise InvalidInput(f"box {[x1, y1, x2, y2]} has an aspect ratio of {ratio:.0f}; the limit is {max_aspect}: "
                           "send a less elongated region")
    return x1, y1, x2, y2

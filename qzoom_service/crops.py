"""Crop handles: the regions a caller cropped from an image, so that it can zoom into a crop again.

A handle (`crop_id`) is a small JSON record in the store (the feature cache: Redis or in-process) naming
the image and the crop's box in original pixels. A box sent relative to a crop maps back to the original
image through it (crops of crops). Each image may have at most `limit` distinct crops, counted by the
store in one atomic step, so concurrent replicas never pass the limit. Shared by the service and anything
else that crops on behalf of a caller; no wire types here.
"""

from __future__ import annotations

import hashlib
import json
import re

from qzoom_client.coords import input_size_for, to_original

from .errors import InvalidInput, LimitExceeded, NotFound
from .geometry import fit_crop_box, validate_box
from .types import Box

__all__ = ["crop_box", "box_in_crop", "remember_crop", "crop_id_for", "check_crop_id", "baseline_tokens"]

# Tokens of the qwen-vl-utils pre-resize bounds, the model's limit at full resolution.
_MIN_TOKENS, _MAX_TOKENS = 4, 16384
_CROP_ID = re.compile(r"crop-[0-9a-f]{24}")


def check_crop_id(crop_id: str) -> None:
    """A crop_id is what `crop_id_for` makes; anything else is a caller's mistake, refused before any lookup."""
    if not isinstance(crop_id, str) or not _CROP_ID.fullmatch(crop_id):
        raise InvalidInput(f"crop_id {str(crop_id)[:80]!r} is not a crop handle ('crop-' and 24 hex digits, as "
                           "ZoomRegion returns); send one from an earlier ZoomRegion, or none")


def _record_key(crop_id: str) -> str:
    # Crop records have their own namespace among the store's blobs: no other record is read as one.
    return f"crop:{crop_id}"


def crop_id_for(image_id: str, box: Box) -> str:
    """The handle of one box of one image: the same crop always gets the same id."""
    return "crop-" + hashlib.sha256(f"{image_id}:{list(box)}".encode()).hexdigest()[:24]


def crop_box(store, image_id: str, image_size, input_size, box, space: str, factor: int, crop_id: str = "") -> Box:
    """A requested box (in `space`, or relative to the crop `crop_id`) -> the int box to crop, original pixels.

    `image_size`: (width, height) of the original; `input_size`: of the model-input image at the default
    budget (the `input` space); `factor`: the model's pixels per merged token side, the smallest crop side.
    Raises InvalidInput / NotFound with what to send instead.
    """
    box = validate_box(box)
    if crop_id:
        box = box_in_crop(store, crop_id, image_id, box, space)
    else:
        box = to_original(box, space, image_size, input_size)
    box = validate_box(box, " once converted to original pixels")  # 1e308 in norm1 is inf in pixels
    # Snap float noise first: 500 of 1000 on 480 px maps to 239.99999999999997, which fit_crop_box's
    # truncation would turn into 239 (a crop one pixel taller than asked for).
    return fit_crop_box(tuple(round(v, 6) for v in box), image_size, min_side=factor)


def box_in_crop(store, crop_id: str, image_id: str, box, space: str) -> tuple[float, float, float, float]:
    """A box relative to an earlier crop -> original pixels (spaces relative to the crop's size)."""
    check_crop_id(crop_id)
    raw = store.get_blob(_record_key(crop_id))
    if raw is None:
        raise NotFound(f"unknown crop_id {crop_id!r}")
    record = json.loads(raw)
    if record["image_id"] != image_id:
        raise InvalidInput(f"crop {crop_id} belongs to another image")
    if space == "input":
        raise InvalidInput("COORD_SPACE_INPUT is not defined for crops; use original, norm1000 or norm1")
    cx1, cy1, cx2, cy2 = record["box"]
    x1, y1, x2, y2 = to_original(box, space, (cx2 - cx1, cy2 - cy1))
    return x1 + cx1, y1 + cy1, min(x2 + cx1, cx2), min(y2 + cy1, cy2)


def remember_crop(store, image_id: str, box: Box, limit: int) -> str:
    """Store the crop's handle and return it; refuse a new crop past `limit` crops of this image.

    A crop already taken is not a new one. Fail-open like the store: when it is unreachable the handle is
    returned unstored (it will answer NOT_FOUND later) and nothing is counted.
    """
    crop_id = crop_id_for(image_id, box)
    if store.get_blob(_record_key(crop_id)) is not None:
        return crop_id
    if not store.count_within_limit(f"crops:{image_id}", limit):
        raise LimitExceeded(f"this image already has {limit} crops (the limit is {limit}); zoom into an "
                            "existing crop_id or answer from what you have")
    store.put_blob(_record_key(crop_id), json.dumps({"image_id": image_id, "box": list(box)}).encode())
    return crop_id


def baseline_tokens(original_size, factor: int) -> int:
    """Merged tokens of the original image at full resolution (capped at 16384, the model's limit).

    `factor`: pixels per merged token side, the model's `patch_size * spatial_merge_size`.
    """
    w, h = input_size_for(*original_size, _MIN_TOKENS * factor * factor, _MAX_TOKENS * factor * factor,
                          factor=factor)
    return (w // factor) * (h // factor)

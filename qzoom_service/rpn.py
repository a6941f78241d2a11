"""Stage 3: the SD-RPN map and map -> box (paper §3.2; reference `get_batched_sub_images_v2`, `get_bbox4src`).

The map lives on the merged-token grid of the coarse model-input image: with `factor` the merged-token
side (patch_size x merge_size, 28 px on Qwen2.5-VL), cell (r, c) covers input pixels
[factor*c, factor*(c+1)) x [factor*r, factor*(r+1)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .coarse import left_padded
from .geometry import grow_to_min_side
from .types import CoarseState

__all__ = ["roi_logits_batch", "roi_logits", "sink_mask", "blur3", "foreground_cells", "cells_to_box", "map_to_box"]

_SIGMA = 1.0


def roi_logits_batch(branches, states: list[CoarseState], merged_hws: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Raw query-key logits of each last prompt token over its coarse image tokens, one (Hm, Wm) per state,
    from one left-padded call of the RPN branch."""
    batch = left_padded(states)
    scores = branches.rpn_logits(batch.h_k, batch.mask, batch.position_embeddings)  # (B, L)
    maps = []
    for row, state, pad, hw in zip(scores, states, batch.pads, merged_hws):
        start = pad + state.image_start
        maps.append(row[start : start + state.num_visual].view(*hw))
    return maps


def roi_logits(branches, state: CoarseState, merged_hw: tuple[int, int]) -> torch.Tensor:
    """`roi_logits_batch` of one state, (Hm, Wm)."""
    return roi_logits_batch(branches, [state], [merged_hw])[0]


def sink_mask(hm: int, wm: int, device=None) -> torch.Tensor:
    """Zero the top-left corner strips where attention sinks live (only for grids of more than 256 cells)."""
    mask = torch.ones(hm, wm, device=device)
    if hm * wm > 256:
        mask[: max(1, hm // 4), 0] = 0
        mask[0, : max(1, wm // 4)] = 0
    return mask


def blur3(prob: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur, sigma 1, reflect padding (torchvision `gaussian_blur` semantics), (H, W) -> (H, W)."""
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float32)
    k1 = torch.exp(-0.5 * (x / _SIGMA) ** 2)
    k1 = (k1 / k1.sum()).to(prob.dtype).to(prob.device)
    kernel = (k1[:, None] * k1[None, :])[None, None]
    h, w = prob.shape
    # reflect needs at least 2 cells along an axis; a 1-cell axis is padded by replication instead.
    mode = "reflect" if h > 1 and w > 1 else "replicate"
    padded = F.pad(prob[None, None], (1, 1, 1, 1), mode=mode)
    return F.conv2d(padded, kernel)[0, 0]


def foreground_cells(prob: torch.Tensor, threshold: float, relative: bool = False) -> torch.Tensor:
    """Boolean (Hm, Wm) foreground: sink-masked, blurred probability strictly above `threshold`.

    `relative=True` compares against threshold x the blurred peak (for maps that are not probabilities).
    """
    hm, wm = prob.shape
    blurred = blur3(prob * sink_mask(hm, wm, prob.device).to(prob.dtype))
    return blurred > (threshold * blurred.max() if relative else threshold)


def cells_to_box(fg: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Merged-grid box (x0, y0, x1, y1), end exclusive, spanning every foreground cell; None if empty."""
    if not bool(fg.any()):
        return None
    rows = fg.any(dim=1).nonzero()[:, 0]
    cols = fg.any(dim=0).nonzero()[:, 0]
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def cell_box_to_original(cell_box, merged_hw, original_size, *, factor: int) -> tuple[int, int, int, int]:
    """Merged-grid box -> original-image pixels, >= `factor` px per side where the image allows.

    Float32 as in the reference: cells x factor -> model-input pixels -> x (original / input size).
    """
    hm, wm = merged_hw
    w0, h0 = original_size
    box = torch.tensor(cell_box, dtype=torch.float32) * float(factor)
    box[0::2] *= w0 / (factor * wm)
    box[1::2] *= h0 / (factor * hm)
    return grow_to_min_side(*box.tolist(), w0, h0, min_side=factor)


def original_to_cell_box(box, merged_hw, original_size) -> tuple[int, int, int, int]:
    """Original-pixel box -> the merged-grid cells it touches (used to align explicit zoom boxes)."""
    hm, wm = merged_hw
    w0, h0 = original_size
    x1, y1, x2, y2 = box
    cx0 = min(wm - 1, max(0, math.floor(x1 / w0 * wm)))
    cy0 = min(hm - 1, max(0, math.floor(y1 / h0 * hm)))
    cx1 = max(cx0 + 1, min(wm, math.ceil(x2 / w0 * wm)))
    cy1 = max(cy0 + 1, min(hm, math.ceil(y2 / h0 * hm)))
    return cx0, cy0, cx1, cy1


def map_to_box(prob: torch.Tensor, threshold: float, original_size, relative: bool = False, *, factor: int):
    """Probability map (Hm, Wm) -> (cell box, original-pixel box), or (None, None) when nothing is above threshold.

    `factor`: merged-token side in model-input pixels, also the smallest box side produced.
    """
    cell_box = cells_to_box(foreground_cells(prob, threshold, relative))
    if cell_box is None:
        return None, None
    return cell_box, cell_box_to_original(cell_box, tuple(prob.shape), original_size, factor=factor)

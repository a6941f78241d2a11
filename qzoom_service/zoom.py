"""Stage 4: crop the original image, re-encode it, insert it after the coarse image and prefill again.

Token layout (github.com/YuHengsss/Q-Zoom's `insert_sub_feat_v2`): `prefix .. coarse <|vision_end|>`,
then `<|vision_start|> RoI tokens <|vision_end|>`, then the question and template tokens. Positions by
one of two schemes: `reuse_src_pos=True` interpolates the RoI's (h, w) over the box's coarse coordinates
(float, corner aligned); `False` places the RoI as a stock second image. Either way the prefix keeps its
positions, which is what makes the layer 0..K-1 cache of the prefix reusable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .coarse import prefill_rest
from .types import CoarseState

__all__ = ["ZoomInput", "encode_crop", "zoom_positions", "build_zoom_input", "splice_roi", "prefill_zoom",
           "prefill_zoom_batch", "forward_full"]


@dataclass
class ZoomInput:
    embeds: torch.Tensor  # (1, L', D) layer-0 inputs of the fused sequence
    positions: torch.Tensor  # (3, 1, L') float32 (reuse scheme) or long
    split: int  # P: index of the coarse <|vision_end|>; tokens before it are unchanged
    num_roi: int  # M merged RoI tokens


def encode_crop(processor, original: Image.Image, box, min_pixels: int, max_pixels: int):
    """Crop the ORIGINAL image and run the image processor at the zoom budget.

    Returns (pixel_values, grid_thw) or None when a crop side is below one merged token (`processor.factor`
    px, 28 on Qwen2.5-VL; the reference skips the RoI).
    """
    crop = original.crop(tuple(int(v) for v in box))
    if crop.width < processor.factor or crop.height < processor.factor:
        return None
    return processor.encode_image(crop, min_pixels, max_pixels)


def zoom_positions(
    positions: torch.Tensor,
    image_start: int,
    coarse_hw: tuple[int, int],
    roi_hw: tuple[int, int],
    cell_box: tuple[int, int, int, int],
    reuse_src_pos: bool,
) -> torch.Tensor:
    """Positions (3, L') of the fused sequence from the coarse positions (3, L).

    With E the position of the coarse <|vision_end|>: RoI <|vision_start|> at E+1; RoI tokens t = E+2 and
    (h, w) by scheme; RoI <|vision_end|> at E + max(hm, wm) + 2; every later token shifted by max(hm, wm) + 2.
    """
    hm_c, wm_c = coarse_hw
    hm, wm = roi_hw
    end = image_start + hm_c * wm_c  # sequence index of the coarse <|vision_end|>
    e = positions[0, end].item()
    advance = max(hm, wm) + 2
    dtype = torch.float32 if reuse_src_pos else positions.dtype
    dev = positions.device
    t = torch.full((hm * wm,), e + 2, dtype=dtype, device=dev)
    if reuse_src_pos:
        x0, y0, x1, y1 = cell_box
        x1, y1 = min(x1, wm_c), min(y1, hm_c)
        h0 = positions[1, image_start].item()  # h (= w) coordinate of coarse cell (0, 0)
        w0 = positions[2, image_start].item()
        hs = torch.linspace(h0 + y0, h0 + y1 - 1, hm, dtype=torch.float32, device=dev)
        ws = torch.linspace(w0 + x0, w0 + x1 - 1, wm, dtype=torch.float32, device=dev)
    else:
        hs = torch.arange(hm, device=dev) + e + 2
        ws = torch.arange(wm, device=dev) + e + 2
    gh, gw = torch.meshgrid(hs.to(dtype), ws.to(dtype), indexing="ij")
    roi = torch.stack([t, gh.flatten(), gw.flatten()])
    start_tok = torch.full((3, 1), e + 1, dtype=dtype, device=dev)
    end_tok = torch.full((3, 1), e + advance, dtype=dtype, device=dev)
    return torch.cat(
        [positions[:, : end + 1].to(dtype), start_tok, roi, end_tok, positions[:, end + 1 :].to(dtype) + advance],
        dim=1,
    )


def build_zoom_input(
    state: CoarseState,
    roi_embeds: torch.Tensor,
    coarse_hw: tuple[int, int],
    roi_hw: tuple[int, int],
    cell_box,
    reuse_src_pos: bool,
) -> ZoomInput:
    """Fused layer-0 inputs after pass 1 (see `splice_roi`)."""
    return splice_roi(state.embeds, state.positions, state.image_start, roi_embeds, coarse_hw, roi_hw, cell_box,
                      reuse_src_pos)


def splice_roi(embeds: torch.Tensor, positions: torch.Tensor, image_start: int, roi_embeds: torch.Tensor,
               coarse_hw: tuple[int, int], roi_hw: tuple[int, int], cell_box, reuse_src_pos: bool) -> ZoomInput:
    """Insert `<|vision_start|> RoI <|vision_end|>` after the coarse image of (1, L, D) `embeds` with
    (3, 1, L) `positions`. The block's start/end embeddings are the coarse ones. Shared by the engine and
    base-model training, so both see the same fused layout."""
    x = embeds
    end = image_start + coarse_hw[0] * coarse_hw[1]
    block = torch.cat([x[:, image_start - 1 : image_start], roi_embeds[None].to(x.dtype), x[:, end : end + 1]], dim=1)
    fused = torch.cat([x[:, : end + 1], block, x[:, end + 1 :]], dim=1)
    pos = zoom_positions(positions[:, 0], image_start, coarse_hw, roi_hw, cell_box, reuse_src_pos)
    return ZoomInput(embeds=fused, positions=pos[:, None], split=end, num_roi=roi_embeds.shape[0])


@torch.no_grad()
def prefill_zoom_batch(model, states: list[CoarseState], zins: list[ZoomInput]):
    """Second prefill of several fused sequences in one padded batch (`coarse.prefill_rest`), each reusing
    its pass-1 K/V of layers 0..K-1 for its unchanged prefix.

    Equivalent to a full forward of the stock LM over each fused sequence. Returns per row (last hidden
    state after the final norm (1, D), cache holding all layers for the fused sequence).
    """
    return prefill_rest(model, states, [z.embeds for z in zins], [z.positions for z in zins], [z.split for z in zins])


def prefill_zoom(model, state: CoarseState, zin: ZoomInput):
    """`prefill_zoom_batch` of one fused sequence."""
    return prefill_zoom_batch(model, [state], [zin])[0]


@torch.no_grad()
def forward_full(model, zin: ZoomInput) -> torch.Tensor:
    """Reference path for tests: the stock language model over the fused sequence from scratch -> logits (1, V)."""
    out = model.model.language_model(inputs_embeds=zin.embeds, position_ids=zin.positions, use_cache=False)
    return model.lm_head(out.last_hidden_state[:, -1])

"""Model inputs for training: square padding, fixed-budget encoding and the frozen trunk to layer K.

Everything goes through the engine's own pieces (`preprocess.preresize`, `Processor.encode_image`,
`Processor.prompt_ids`, `coarse.encode_images`, `coarse.prefill_to_k`), so a branch is trained on exactly
the prompt layout, pixel pipeline and trunk states it sees at inference (OUR choice: one chat
template, with the model's system prompt, for both; the reference implementation trains without it).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from PIL import Image

from ..coarse import encode_images, prefill_to_k
from ..config import RequestOptions
from ..preprocess import preresize
from ..types import CoarseState, Prepared

__all__ = ["PAD_COLOUR", "square_pad", "padded_frame", "encode_at_budget", "trunk_state", "for_branch"]

PAD_COLOUR = (127, 127, 127)  # the reference's `expand2square` fill


def square_pad(image: Image.Image, fill=PAD_COLOUR) -> Image.Image:
    """Pad to a square with `fill`, content centred (LLaVA/Q-Zoom `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def padded_frame(original_size: tuple[int, int]) -> tuple[int, int, int]:
    """(side, x offset, y offset) of the original image inside its `square_pad` canvas."""
    w, h = original_size
    side = max(w, h)
    return side, (side - w) // 2, (side - h) // 2


def encode_at_budget(processor, image: Image.Image, question: str, tokens: int) -> Prepared:
    """Tokenize the chat prompt and encode `image` at min = max = `tokens` merged tokens (x factor^2 pixels).

    The fixed budget is how both training stages feed images (the reference's stage-1 script and its
    `create_high_res_signal`).
    """
    pixels = tokens * processor.factor**2
    pixel_values, grid = processor.encode_image(preresize(image, processor.factor), pixels, pixels)
    num_visual = int(grid[0].prod()) // processor.merge_size**2
    input_ids = processor.prompt_ids(question, num_visual)
    return Prepared(original=image, input_ids=input_ids, pixel_values=pixel_values, grid_thw=grid,
                    options=RequestOptions(min_pixels=pixels, max_pixels=pixels), patch_size=processor.patch_size,
                    merge_size=processor.merge_size)


@torch.no_grad()
def trunk_state(model, prepared: Prepared, k: int) -> CoarseState:
    """Frozen trunk: vision tower and text layers 0..k-1, under no_grad (no gradient flows
    into the trunk, so it need not be part of the autograd graph)."""
    (embeds,) = encode_images(model, prepared.pixel_values, prepared.grid_thw)
    return prefill_to_k(model, prepared, embeds, k)


def for_branch(state: CoarseState, dtype: torch.dtype) -> CoarseState:
    """The trunk state with h_K and the rotary tables cast to the branch's (master-weight) dtype."""
    cos, sin = state.position_embeddings
    return replace(state, h_k=state.h_k.to(dtype), position_embeddings=(cos.to(dtype), sin.to(dtype)))

"""Training-free RoI for plain Qwen2.5-VL weights (no SD-RPN branch), ViCrop-style.

The attention of the last prompt token over the image tokens at a middle trunk layer, divided by the
same attention under a generic prompt ("Write a general description of the image."), highlights what
the question asks about rather than what every prompt looks at (sinks, salient clutter). The ratio is
scaled to [0, 1] by its maximum and goes through the same sink mask and blur as the SD-RPN map; the
threshold is relative to the blurred peak (default 0.5 of it), since the map is not a probability.
"""

from __future__ import annotations

import torch

from .heads import last_token_qk
from .types import CoarseState

__all__ = ["attention_map", "GENERIC_PROMPT", "DEFAULT_ATTENTION_ROI_THRESHOLD"]

GENERIC_PROMPT = "Write a general description of the image."
DEFAULT_ATTENTION_ROI_THRESHOLD = 0.5


def _image_attention(layer, state: CoarseState) -> torch.Tensor:
    """Softmax attention of the last token over all tokens, restricted to the image, mean over heads: (Nv,)."""
    probs = torch.softmax(last_token_qk(layer, state.h_k, state.position_embeddings).float(), dim=-1)
    return probs[:, state.image_start : state.image_start + state.num_visual].mean(0)


@torch.no_grad()
def attention_map(model, question_state: CoarseState, generic_state: CoarseState, merged_hw) -> torch.Tensor:
    """Relative attention map (Hm, Wm) in [0, 1] read at trunk layer K (the prefix both states share)."""
    layer = model.model.language_model.layers[question_state.branch_layer]
    ratio = _image_attention(layer, question_state) / _image_attention(layer, generic_state).clamp_min(1e-12)
    return (ratio / ratio.max().clamp_min(1e-12)).view(*merged_hw)

"""The stage-1 teacher: the model's own greedy answer and its answer-to-image attention.

The reference implementation (github.com/YuHengsss/Q-Zoom, `get_attn_weights_map`) hooks every decoder
layer during `generate` and keeps, for each decode step, the attention row of the token fed back (answer
tokens y_1 .. y_{n-1}; the last generated token is never fed back). A
teacher-forced pass over prompt + y_1..y_{n-1} gives the same rows (causal attention, same prefix), so
that is what runs here. The probabilities are recomputed from each layer's input with
`heads.last_token_qk` (softmax over every key, not renormalised over the image), which works whatever
attention implementation the model was loaded with.
"""

from __future__ import annotations

import torch

from ..coarse import causal_mask, embed_prompt, encode_images, prefill_to_k, rope_positions, run_layers
from ..decode import finish_prefill, greedy_decode
from ..heads import last_token_qk
from ..types import Prepared

__all__ = ["greedy_answer_ids", "answer_attention"]


@torch.no_grad()
def greedy_answer_ids(model, prepared: Prepared, image_embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The teacher's answer: greedy decoding with the checkpoint's generation_config (eos, repetition
    penalty), no RoI pass. Sampling settings of the reference teacher are UNKNOWN."""
    num_layers = model.config.text_config.num_hidden_layers
    state = prefill_to_k(model, prepared, image_embeds, num_layers)
    hidden = finish_prefill(model, state)
    return greedy_decode(model, hidden, state.cache, state.positions[:, :, -1:], prepared.input_ids, max_new_tokens)


@torch.no_grad()
def answer_attention(model, prepared: Prepared, answer_ids: list[int], layers, image_embeds=None) -> dict:
    """Attention of answer tokens y_1..y_{n-1} to the image tokens, averaged over those rows.

    answer_ids: y_1..y_n (n >= 2). Returns {layer: (H, Nv) float32} for each requested layer (0-based),
    the values being softmax probabilities over the whole sequence (the reference's `output2images`).
    """
    if len(answer_ids) < 2:
        raise ValueError("need at least two answer tokens: the last one is never fed back")
    if image_embeds is None:
        (image_embeds,) = encode_images(model, prepared.pixel_values, prepared.grid_thw)
    lm = model.model.language_model
    device = lm.embed_tokens.weight.device
    fed = torch.tensor([answer_ids[:-1]], dtype=torch.long)
    ids = torch.cat([prepared.input_ids, fed], dim=1).to(device)  # (1, L)
    first_row, length = prepared.input_ids.shape[1], ids.shape[1]
    x = embed_prompt(model, ids, [image_embeds])
    cos, sin = lm.rotary_emb(x, rope_positions(model, ids, prepared.grid_thw.to(device)))
    mask = causal_mask(length, length, x.dtype, device)
    image_cols = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    wanted = set(layers)
    out, h = {}, x
    for i, layer in enumerate(lm.layers[: max(wanted) + 1]):
        if i in wanted:
            rows = []
            for r in range(first_row, length):
                # The layer input up to row r: row r is then the "last token" (causality gives the rest).
                scores = last_token_qk(layer, h[:, : r + 1], (cos[:, : r + 1], sin[:, : r + 1]))  # (H, r+1)
                rows.append(torch.softmax(scores.float(), dim=-1)[:, image_cols])
            out[i] = torch.stack(rows).mean(0)  # (H, Nv)
        h = run_layers([layer], h, mask, (cos, sin))
    return out

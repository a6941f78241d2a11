"""Decode rows for the decoding tests: text prompts prefilled on a tiny model, and the one-row decode as it
was before batching, which every batched or looped decode must reproduce."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache, RepetitionPenaltyLogitsProcessor

from qzoom_service import decode
from qzoom_service.decode import DecodeItem


def prefilled(model, length: int, seed: int, offset: float = 0.0, float_positions: bool = False):
    """(hidden (1, D), cache, last position (3, 1, 1), prompt ids (1, L)) of a text prompt whose M-RoPE
    positions start at `offset` (as after an image, where positions run behind sequence indices)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (1, length), generator=g)
    pos = (torch.arange(length, dtype=torch.float32) + offset).expand(3, 1, length).clone()
    if not float_positions:
        pos = pos.long()
    lm = model.model.language_model
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        out = lm(input_ids=ids, position_ids=pos, cache=cache, use_cache=True)
    return out.last_hidden_state[:, -1], cache, pos[:, :, -1:], ids


def reference_decode(model, hidden, cache, position, prompt_ids, max_new_tokens, penalty, stop) -> list[int]:
    """The one-row decode as it was before batching: a host sync per token, the stock penalty processor."""
    lm = model.model.language_model
    processor = RepetitionPenaltyLogitsProcessor(penalty) if penalty != 1.0 else None
    seen, out = prompt_ids, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model.lm_head(hidden).float()
            if processor is not None:
                logits = processor(seen, logits)
            token = int(logits.argmax(-1))
            out.append(token)
            if token in stop or len(out) == max_new_tokens:
                break
            token_t = torch.tensor([[token]])
            seen = torch.cat([seen, token_t], dim=1)
            position = position + 1
            x = lm.embed_tokens(token_t)
            h = decode.run_layers(lm.layers, x, None, lm.rotary_emb(x, position), cache)
            hidden = lm.norm(h[:, -1])
    return out


def make_item(row, max_new_tokens, penalty, stop) -> DecodeItem:
    hidden, cache, position, ids = row
    return DecodeItem(hidden=hidden, cache=copy.deepcopy(cache), position=position, prompt_ids=ids,
                      max_new_tokens=max_new_tokens, repetition_penalty=penalty, stop_ids=frozenset(stop))


def reference(model, row, max_new_tokens, penalty, stop) -> list[int]:
    hidden, cache, position, ids = row
    return reference_decode(model, hidden, copy.deepcopy(cache), position, ids, max_new_tokens, penalty, stop)


def standard_rows(model) -> list:
    """Four prompts of different lengths and position offsets, one with float positions."""
    return [
        prefilled(model, 5, seed=0),
        prefilled(model, 23, seed=1, offset=-9.0),
        prefilled(model, 41, seed=2, offset=3.0, float_positions=True),
        prefilled(model, 12, seed=3, offset=-4.0),
    ]


def layer_length(cache) -> int:
    return decode.layer_kv(cache, 0)[0].shape[-2]

"""Stage 1: encode the coarse image and run trunk layers 0..K-1 with a KV cache (paper §3.1), and the
batched continuation of such prefixes (`prefill_rest`: the plain prefill's layers K..N-1 and the zoom's
fused prefill share it).

Batches are padded here and nowhere else (`place`, `span_mask`, `left_padded`): rows are placed at an
offset in a zero tensor and the keys outside each row's span are masked, so every row computes what it
computes alone (up to floating-point summation order).

Works on the stock `Qwen2_5_VLForConditionalGeneration` through its public pieces: the vision tower,
`get_rope_index`, `embed_tokens`, `rotary_emb` and the decoder layers. Positions are always passed
explicitly; the model's own `rope_deltas` attribute is never read, so concurrent requests are safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .types import CoarseState, Prepared

__all__ = [
    "encode_images",
    "embed_prompt",
    "rope_positions",
    "causal_mask",
    "run_layers",
    "prefill_to_k",
    "prefill_batch_to_k",
    "prefill_rest",
    "place",
    "span_mask",
    "Padded",
    "left_padded",
    "layer_kv",
]


def _lm(model):
    return model.model.language_model


@torch.no_grad()
def encode_images(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Vision tower + merger for several images in one call -> one (N_i, D) tensor per image."""
    visual = model.model.visual
    out = visual(pixel_values.to(device=visual.device, dtype=visual.dtype), grid_thw=grid_thw.to(visual.device))
    merged = out.pooler_output  # (sum N_i, D), raster order per image
    sizes = (grid_thw.prod(-1) // visual.spatial_merge_size**2).tolist()
    return list(torch.split(merged, sizes))


def embed_prompt(model, input_ids: torch.Tensor, image_embeds: list[torch.Tensor]) -> torch.Tensor:
    """Token embeddings (1, L, D) with the image features scattered into the <|image_pad|> slots."""
    lm = _lm(model)
    ids = input_ids.to(lm.embed_tokens.weight.device)
    x = lm.embed_tokens(ids)
    feats = torch.cat(image_embeds).to(x.dtype)
    slots = ids == model.config.image_token_id
    if int(slots.sum()) != feats.shape[0]:
        raise AssertionError(f"{int(slots.sum())} image slots for {feats.shape[0]} image features")
    return x.masked_scatter(slots.unsqueeze(-1), feats)


def rope_positions(model, input_ids: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Stock 3-D M-RoPE positions (3, 1, L); `mm_token_type_ids` is derived from the ids."""
    types = (input_ids == model.config.image_token_id).int()
    pos, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid_thw)
    return pos


def causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive (1, 1, q, kv) mask, bottom-right aligned: query i sees keys up to kv_len - q_len + i.

    Explicit because torch SDPA's implicit `is_causal` is top-left aligned when q_len != kv_len.
    """
    if q_len == 1:
        return None
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(k > q, torch.finfo(dtype).min)
    return mask[None, None]


def run_layers(layers, h, mask, position_embeddings, cache=None) -> torch.Tensor:
    for layer in layers:
        h = layer(
            h,
            attention_mask=mask,
            position_ids=None,  # M-RoPE goes only through position_embeddings
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )
    return h


@torch.no_grad()
def prefill_to_k(model, prepared: Prepared, image_embeds: torch.Tensor, branch_layer: int) -> CoarseState:
    """Pass 1: embeddings, positions and trunk layers 0..K-1 (cached) over the whole prompt; K = `branch_layer`."""
    lm = _lm(model)
    device = lm.embed_tokens.weight.device
    ids = prepared.input_ids.to(device)
    x = embed_prompt(model, ids, [image_embeds])
    pos = rope_positions(model, ids, prepared.grid_thw.to(device))
    cs = lm.rotary_emb(x, pos)
    cache = DynamicCache(config=model.config.text_config)
    mask = causal_mask(x.shape[1], x.shape[1], x.dtype, device)
    h_k = run_layers(lm.layers[:branch_layer], x, mask, cs, cache)
    start = int((ids[0] == model.config.image_token_id).nonzero()[0, 0])
    return CoarseState(
        embeds=x,
        positions=pos,
        position_embeddings=cs,
        h_k=h_k,
        cache=cache,
        branch_layer=branch_layer,
        image_start=start,
        num_visual=image_embeds.shape[0],
    )


@torch.no_grad()
def prefill_batch_to_k(model, prepared: list[Prepared], image_embeds: list[torch.Tensor],
                       branch_layer: int) -> list[CoarseState]:
    """Pass 1 for several prompts in one left-padded batch; returns one unpadded `CoarseState` per prompt."""
    if len(prepared) == 1:
        return [prefill_to_k(model, prepared[0], image_embeds[0], branch_layer)]
    lm = _lm(model)
    device = lm.embed_tokens.weight.device
    ids = [p.input_ids.to(device) for p in prepared]
    embeds = [embed_prompt(model, i, [e]) for i, e in zip(ids, image_embeds)]
    positions = [rope_positions(model, i, p.grid_thw.to(device)) for i, p in zip(ids, prepared)]
    length = max(i.shape[1] for i in ids)
    pads = [length - i.shape[1] for i in ids]
    x = place(embeds, pads, length, seq_dim=1)  # (B, L, D)
    cos, sin = lm.rotary_emb(x, place(positions, pads, length, seq_dim=2, batch_dim=1))
    mask = span_mask([(pad, length) for pad in pads], length, length, x.dtype, device)
    cache = DynamicCache(config=model.config.text_config)
    h_k = run_layers(lm.layers[:branch_layer], x, mask, (cos, sin), cache)
    states = []
    for b, (e, q, i, pad, emb) in enumerate(zip(embeds, positions, ids, pads, image_embeds)):
        row_cache = DynamicCache(config=model.config.text_config)
        for layer in range(branch_layer):
            keys, values = layer_kv(cache, layer)
            row_cache.update(keys[b : b + 1, :, pad:], values[b : b + 1, :, pad:], layer)
        states.append(CoarseState(
            embeds=e, positions=q, position_embeddings=(cos[b : b + 1, pad:], sin[b : b + 1, pad:]),
            h_k=h_k[b : b + 1, pad:], cache=row_cache, branch_layer=branch_layer,
            image_start=int((i[0] == model.config.image_token_id).nonzero()[0, 0]), num_visual=emb.shape[0],
        ))
    return states


@torch.no_grad()
def prefill_rest(model, states: list[CoarseState], embeds: list[torch.Tensor], positions: list[torch.Tensor],
                 splits: list[int]) -> list[tuple[torch.Tensor, DynamicCache]]:
    """Finish several prefills from their pass-1 prefixes in one padded batch.

    Row b keeps the first `splits[b]` tokens of its pass-1 state (their layer 0..K-1 K/V and h_K), runs
    trunk layers 0..K-1 over the tokens of `embeds[b]` (1, L_b, D) after the split, then layers K..N-1
    over all L_b tokens; `positions[b]`: (3, 1, L_b). The plain prefill is the case split = L_b (no new
    tokens); the zoom's fused prefill splits at the coarse <|vision_end|>. Layout: each kept prefix ends at
    S = max split (left padding), the new tokens follow from S (right padding to S + T).

    Returns per row (last hidden state after the final norm (1, D), an unpadded batch-1 cache of every
    layer over the row's L_b tokens).
    """
    lm = _lm(model)
    k = states[0].branch_layer
    prefix = max(splits)
    offsets = [prefix - s for s in splits]
    new = [e[:, s:] for e, s in zip(embeds, splits)]
    spans = [(o, prefix + n.shape[1]) for o, n in zip(offsets, new)]
    length = max(end for _, end in spans)
    h = place([st.h_k[:, :s] for st, s in zip(states, splits)], offsets, prefix, seq_dim=1)  # (B, S, D)
    dtype, device = h.dtype, h.device
    cos, sin = lm.rotary_emb(h, place(positions, offsets, length, seq_dim=2, batch_dim=1))  # (B, S+T, d)
    cache = DynamicCache(config=model.config.text_config)
    for i in range(k):
        keys, values = zip(*(layer_kv(st.cache, i) for st in states))
        cache.update(place([x[:, :, :s] for x, s in zip(keys, splits)], offsets, prefix, seq_dim=2),
                     place([x[:, :, :s] for x, s in zip(values, splits)], offsets, prefix, seq_dim=2), i)
    if length > prefix:
        x = place(new, [0] * len(new), length - prefix, seq_dim=1)  # (B, T, D)
        mask = span_mask(spans, length - prefix, length, dtype, device)
        h = torch.cat([h, run_layers(lm.layers[:k], x, mask, (cos[:, prefix:], sin[:, prefix:]), cache)], dim=1)
    h = run_layers(lm.layers[k:], h, span_mask(spans, length, length, dtype, device), (cos, sin), cache)
    out = []
    for b, (start, end) in enumerate(spans):
        row_cache = DynamicCache(config=model.config.text_config)
        for i in range(len(lm.layers)):
            keys, values = layer_kv(cache, i)
            row_cache.update(keys[b : b + 1, :, start:end], values[b : b + 1, :, start:end], i)
        out.append((lm.norm(h[b : b + 1, end - 1]), row_cache))
    return out


def place(rows: list[torch.Tensor], offsets: list[int], length: int, seq_dim: int, batch_dim: int = 0) -> torch.Tensor:
    """Batch-1 tensors, each zero-padded along `seq_dim` to `length` with its data at its offset, stacked
    along `batch_dim` (the one home of the padding)."""
    out = []
    for row, offset in zip(rows, offsets):
        after = length - offset - row.shape[seq_dim]
        out.append(F.pad(row, (0, 0) * (row.dim() - 1 - seq_dim) + (offset, after)))
    return torch.cat(out, dim=batch_dim)


def span_mask(spans: list[tuple[int, int]], q_len: int, kv_len: int, dtype, device) -> torch.Tensor:
    """Additive (B, 1, q, kv) mask: causal, bottom-right aligned, and row b sees only keys in [start, end)."""
    mask = causal_mask(q_len, kv_len, dtype, device)
    mask = (mask if mask is not None else torch.zeros(1, 1, 1, kv_len, dtype=dtype, device=device))
    mask = mask.repeat(len(spans), 1, 1, 1)
    keys = torch.arange(kv_len, device=device)
    for b, (start, end) in enumerate(spans):
        mask[b, :, :, (keys < start) | (keys >= end)] = torch.finfo(dtype).min
    return mask


@dataclass
class Padded:
    """Several pass-1 states left-padded to one length L: last prompt tokens share index -1."""

    h_k: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, 1, L, L) additive, causal, padding hidden
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, L, d)
    pads: list[int]  # left padding of each row


def left_padded(states: list[CoarseState]) -> Padded:
    """The branches' input for a batch: h_K, mask and (cos, sin) of every state, left-padded."""
    length = max(s.h_k.shape[1] for s in states)
    pads = [length - s.h_k.shape[1] for s in states]
    h = place([s.h_k for s in states], pads, length, seq_dim=1)
    cos, sin = (place([s.position_embeddings[j] for s in states], pads, length, seq_dim=1) for j in (0, 1))
    mask = span_mask([(pad, length) for pad in pads], length, length, h.dtype, h.device)
    return Padded(h_k=h, mask=mask, position_embeddings=(cos, sin), pads=pads)


def layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of layer i, each (B, Hkv, T, d). Wraps the cache API, which moves across 5.x minors."""
    layer = cache.layers[i]
    return layer.keys, layer.values


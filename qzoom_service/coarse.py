"""Stage 1: encode the coarse image and run trunk layers 0..K-1 with a KV cache (paper §3.1).

Works on the stock `Qwen2_5_VLForConditionalGeneration` through its public pieces: the vision tower,
`get_rope_index`, `embed_tokens`, `rotary_emb` and the decoder layers. Positions are always passed
explicitly; the model's own `rope_deltas` attribute is never read, so concurrent requests are safe.
"""

from __future__ import annotations

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
    "layer_kv",
    "truncated_cache",
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
    """Pass 1 for several prompts in one left-padded batch; returns one unpadded `CoarseState` per prompt.

    Padding keys are masked out, so each row computes what `prefill_to_k` computes for it alone (up to
    floating-point summation order); later stages then run per row on the sliced states.
    """
    if len(prepared) == 1:
        return [prefill_to_k(model, prepared[0], image_embeds[0], branch_layer)]
    lm = _lm(model)
    device = lm.embed_tokens.weight.device
    rows = []
    for p, emb in zip(prepared, image_embeds):
        ids = p.input_ids.to(device)
        rows.append((embed_prompt(model, ids, [emb]), rope_positions(model, ids, p.grid_thw.to(device)), ids))
    length = max(x.shape[1] for x, _, _ in rows)
    pads = [length - x.shape[1] for x, _, _ in rows]
    x = torch.cat([F.pad(e, (0, 0, pad, 0)) for (e, _, _), pad in zip(rows, pads)])  # (B, L, D)
    pos = torch.cat([F.pad(q, (pad, 0)) for (_, q, _), pad in zip(rows, pads)], dim=1)  # (3, B, L)
    cos, sin = lm.rotary_emb(x, pos)
    mask = _padded_causal_mask(pads, length, x.dtype, device)
    cache = DynamicCache(config=model.config.text_config)
    h_k = run_layers(lm.layers[:branch_layer], x, mask, (cos, sin), cache)
    states = []
    for b, ((e, q, ids), pad, emb) in enumerate(zip(rows, pads, image_embeds)):
        row_cache = DynamicCache(config=model.config.text_config)
        for i in range(branch_layer):
            keys, values = layer_kv(cache, i)
            row_cache.update(keys[b : b + 1, :, pad:], values[b : b + 1, :, pad:], i)
        states.append(CoarseState(
            embeds=e, positions=q, position_embeddings=(cos[b : b + 1, pad:], sin[b : b + 1, pad:]),
            h_k=h_k[b : b + 1, pad:], cache=row_cache, branch_layer=branch_layer,
            image_start=int((ids[0] == model.config.image_token_id).nonzero()[0, 0]), num_visual=emb.shape[0],
        ))
    return states


def _padded_causal_mask(pads: list[int], length: int, dtype, device) -> torch.Tensor:
    """Additive (B, 1, L, L) causal mask that also hides each row's left padding."""
    mask = causal_mask(length, length, dtype, device).repeat(len(pads), 1, 1, 1)
    for b, pad in enumerate(pads):
        mask[b, :, :, :pad] = torch.finfo(dtype).min
    return mask


def layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of layer i, each (B, Hkv, T, d). Wraps the cache API, which moves across 5.x minors."""
    layer = cache.layers[i]
    return layer.keys, layer.values


def truncated_cache(model, cache, num_layers: int, length: int) -> DynamicCache:
    """A new cache holding the first `length` positions of layers 0..num_layers-1 of `cache`."""
    out = DynamicCache(config=model.config.text_config)
    for i in range(num_layers):
        keys, values = layer_kv(cache, i)
        out.update(keys[:, :, :length], values[:, :, :length], i)
    return out

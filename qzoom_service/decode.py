"""Stage 5: finish the plain prefill (layers K..N-1) and greedy-decode from caches, one row or many.

Decoding honours the checkpoint's `generation_config.json`: eos ids and `repetition_penalty` (applied,
as `generate` does, over the original prompt ids plus the generated ids). Sampling is not offered:
Q-Zoom's accuracy figures are greedy.

`decode_batch` decodes rows with different prompts, lengths and settings together: their caches are
left-padded into one batched cache, one additive mask hides the padding (extended by one column per
step), and tokens stay on the device except for one small transfer per stop check. `DecodeBatch` is the
step-level state underneath, which `decode_loop.DecodeLoop` drives with rows joining and leaving.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .coarse import causal_mask, layer_kv, run_layers
from .types import CoarseState

__all__ = ["DecodeItem", "DecodeBatch", "decode_item", "decode_batch", "finish_prefill", "greedy_decode", "eos_ids"]


@torch.no_grad()
def finish_prefill(model, state: CoarseState) -> torch.Tensor:
    """Run trunk layers K..N-1 on h_K, extending the pass-1 cache; returns the normed last hidden (1, D)."""
    lm = model.model.language_model
    length = state.h_k.shape[1]
    mask = causal_mask(length, length, state.h_k.dtype, state.h_k.device)
    h = run_layers(lm.layers[state.branch_layer :], state.h_k, mask, state.position_embeddings, state.cache)
    return lm.norm(h[:, -1])


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


@dataclass
class DecodeItem:
    """One row to decode: what a prefill (direct or zoom) leaves behind, plus its decoding settings."""

    hidden: torch.Tensor  # (1, D) last prompt token's hidden state after the final norm (lm_head input)
    cache: DynamicCache  # batch 1, all N layers for the prompt; the decoder takes it over (may extend it in place)
    position: torch.Tensor  # (3, 1, 1) M-RoPE position of the last prompt token (long, or float32 when interpolated)
    prompt_ids: torch.Tensor  # (1, L) ids the repetition penalty counts, with the generated ones
    max_new_tokens: int
    repetition_penalty: float = 1.0  # 1.0: none
    stop_ids: frozenset[int] = frozenset()  # decoding ends after one of these; it is included in the output


def decode_item(model, hidden, cache, position, prompt_ids, max_new_tokens: int,
                repetition_penalty: float | None = None) -> DecodeItem:
    """A `DecodeItem` with the checkpoint's defaults: its eos ids and, when not given, its repetition penalty."""
    penalty = model.generation_config.repetition_penalty if repetition_penalty is None else repetition_penalty
    return DecodeItem(hidden=hidden, cache=cache, position=position, prompt_ids=prompt_ids,
                      max_new_tokens=max_new_tokens, repetition_penalty=1.0 if penalty is None else float(penalty),
                      stop_ids=frozenset(eos_ids(model)))


@torch.no_grad()
def greedy_decode(
    model,
    last_hidden: torch.Tensor,
    cache,
    last_position: torch.Tensor,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    repetition_penalty: float | None = None,
) -> list[int]:
    """Greedy tokens after a prefill. last_position: (3, 1, 1) position of the last prompt token.

    Generated tokens take positions last_position + 1, + 2, ... on all three axes. The eos token, when
    produced, is included (as in `generate` output). A one-row `decode_batch`.
    """
    item = decode_item(model, last_hidden, cache, last_position, prompt_ids, max_new_tokens, repetition_penalty)
    return decode_batch(model, [item])[0]


def decode_batch(model, items: list[DecodeItem], check_every: int = 1) -> list[list[int]]:
    """Greedy tokens for each item, all rows decoded together; row i's ids equal a one-row decode of item i."""
    batch = DecodeBatch(model, check_every)
    out: list[list[int] | None] = [None] * len(items)
    for i, ids in batch.join(items, list(range(len(items)))):
        out[i] = ids
    while batch:
        for i, ids in batch.step():
            out[i] = ids
    return out


@dataclass
class _Row:
    key: object
    max_new_tokens: int
    stop_ids: frozenset[int]
    penalty: float
    pad: int  # left-padding columns of this row in the batched cache
    tokens: list[int] = field(default_factory=list)

    def take(self, new: list[int]) -> bool:
        """Append checked tokens up to a stop; True when the row is finished."""
        for token in new:
            self.tokens.append(token)
            if token in self.stop_ids or len(self.tokens) == self.max_new_tokens:
                return True
        return False


class DecodeBatch:
    """The live rows of a batched greedy decode: one forward per step for all of them.

    Rows `join` with their caches merged into one batched cache, left-padded to a common length; the
    additive mask hiding the padding is built then and grows by one zero column per step. Each `step`
    picks every row's next token on the device; every `check_every` steps (sooner when a row reaches its
    budget) one (B, k) transfer brings the new tokens to the host for the stop check, and finished rows
    leave at once (the batch is re-indexed, and padding no longer needed is trimmed). Rows join only at a
    check (`can_join`), so all rows' unchecked tokens line up.
    """

    def __init__(self, model, check_every: int = 1):
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {check_every}")
        self.model = model
        self.check_every = check_every
        self._lm = model.model.language_model
        self._rows: list[_Row] = []
        self._pending: list[torch.Tensor] = []  # (B,) tokens not yet checked, oldest first
        self._clear()

    def _clear(self) -> None:
        self._cache = None  # DynamicCache, (B, Hkv, T, d) per layer
        self._hidden = None  # (B, D) input of the next lm_head
        self._token = None  # (B,) last token, input of the next forward
        self._positions = None  # (3, B, 1) float32 position of the last token
        self._seen = None  # (B, V) bool: ids the repetition penalty applies to; None when no row has one
        self._mask = None  # (B, 1, 1, T) additive; None when no row is padded
        self._penalties = None  # float, or (B, 1) per-row penalties; computed on first use

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def keys(self) -> list:
        return [row.key for row in self._rows]

    @property
    def can_join(self) -> bool:
        return not self._pending

    @torch.no_grad()
    def join(self, items: list[DecodeItem], keys: list) -> list[tuple[object, list[int]]]:
        """Add rows; returns (key, []) at once for items with no token budget. Nothing changes if it raises."""
        assert self.can_join, "rows join only at a stop check"
        done = [(key, []) for item, key in zip(items, keys) if item.max_new_tokens < 1]
        new = [(item, key) for item, key in zip(items, keys) if item.max_new_tokens >= 1]
        if not new:
            return done
        device = self._lm.embed_tokens.weight.device
        num_layers = len(self._lm.layers)
        lengths = [_cache_length(item.cache, num_layers) for item, _ in new]
        old_length = _cache_length(self._cache, num_layers) if self._rows else 0
        length = max(old_length, *lengths)
        pads = [row.pad + length - old_length for row in self._rows] + [length - n for n in lengths]
        if not self._rows and len(new) == 1:
            cache = new[0][0].cache  # nothing to merge: decode in the caller's cache, as a single decode does
        else:
            cache = self._merged_cache([self._cache] * bool(self._rows) + [item.cache for item, _ in new], length)
        hidden = torch.cat(([self._hidden] if self._rows else []) + [item.hidden.to(device) for item, _ in new])
        positions = torch.cat(([self._positions] if self._rows else [])
                              + [item.position.to(device, torch.float32) for item, _ in new], dim=1)
        rows = self._rows + [_Row(key, item.max_new_tokens, frozenset(item.stop_ids), float(item.repetition_penalty),
                                  0) for item, key in new]
        seen = self._joined_seen(rows, [item.prompt_ids for item, _ in new], device)
        mask = _padding_mask(pads, length, hidden.dtype, device)
        # Commit: nothing above changed the batch.
        for row, pad in zip(rows, pads):
            row.pad = pad
        self._rows, self._cache, self._hidden, self._positions, self._seen, self._mask = (
            rows, cache, hidden, positions, seen, mask)
        self._penalties = None
        return done

    def _merged_cache(self, caches: list, length: int) -> DynamicCache:
        merged = DynamicCache(config=self.model.config.text_config)
        for i in range(len(self._lm.layers)):
            keys, values = zip(*(layer_kv(c, i) for c in caches))
            merged.update(torch.cat([_left_pad(k, length) for k in keys]),
                          torch.cat([_left_pad(v, length) for v in values]), i)
        return merged

    def _joined_seen(self, rows: list[_Row], prompt_ids: list[torch.Tensor], device) -> torch.Tensor | None:
        if all(row.penalty == 1.0 for row in rows):
            return None
        vocab = self.model.lm_head.weight.shape[0]
        old = self._seen if self._seen is not None else torch.zeros(len(self._rows), vocab, dtype=torch.bool,
                                                                   device=device)
        new = torch.zeros(len(prompt_ids), vocab, dtype=torch.bool, device=device)
        for j, ids in enumerate(prompt_ids):
            ids = ids.reshape(-1).to(device)
            new[j, ids[ids < vocab]] = True  # ids past the lm_head vocabulary cannot be generated: no penalty
        return torch.cat([old, new])

    @torch.no_grad()
    def step(self) -> list[tuple[object, list[int]]]:
        """One token for every live row; returns the rows that finished, as (key, token ids)."""
        assert self._rows, "step on an empty batch"
        logits = self.model.lm_head(self._hidden).float()  # (B, V)
        if self._seen is not None:
            logits = torch.where(self._seen, _penalized(logits, self._penalty()), logits)
        token = logits.argmax(-1)  # (B,)
        if self._seen is not None:
            self._seen.scatter_(1, token[:, None], True)
        self._pending.append(token)
        self._token = token
        finished = self._check() if self._check_due() else []
        if self._rows:
            self._forward()
        return finished

    def _penalty(self) -> float | torch.Tensor:
        if self._penalties is None:  # once per membership change
            values = [row.penalty for row in self._rows]
            # One value stays a Python scalar, as in the stock processor (CUDA divides by a host scalar via
            # its reciprocal, so a tensor would differ in the last bit there).
            if len(set(values)) == 1:
                self._penalties = values[0]
            else:
                self._penalties = torch.tensor(values, device=self._seen.device)[:, None]  # (B, 1)
        return self._penalties

    def _check_due(self) -> bool:
        unchecked = len(self._pending)
        return unchecked >= self.check_every or any(
            len(row.tokens) + unchecked >= row.max_new_tokens for row in self._rows
        )

    def _check(self) -> list[tuple[object, list[int]]]:
        columns = torch.stack(self._pending, dim=1).tolist()  # (B, k): the one host transfer
        self._pending.clear()
        finished, keep = [], []
        for b, (row, new) in enumerate(zip(self._rows, columns)):
            if row.take(new):
                finished.append((row.key, row.tokens))
            else:
                keep.append(b)
        if finished:
            self._keep(keep)
        return finished

    def _keep(self, keep: list[int]) -> None:
        """Re-index the batch to the rows `keep`, trimming left padding that no remaining row needs."""
        self._rows = [self._rows[b] for b in keep]
        if not self._rows:
            self._clear()
            return
        index = torch.tensor(keep, device=self._hidden.device)
        self._penalties = None
        trim = min(row.pad for row in self._rows)
        for row in self._rows:
            row.pad -= trim
        for i in range(len(self._lm.layers)):
            keys, values = layer_kv(self._cache, i)
            _set_layer_kv(self._cache, i, keys[index, :, trim:], values[index, :, trim:])
        self._hidden, self._token = self._hidden[index], self._token[index]
        self._positions = self._positions[:, index]
        if self._seen is not None:
            self._seen = None if all(row.penalty == 1.0 for row in self._rows) else self._seen[index]
        if any(row.pad for row in self._rows):
            self._mask = self._mask[index, :, :, trim:]
        else:
            self._mask = None

    def _forward(self) -> None:
        """Run the last tokens through all layers; their K/V extend the batched cache."""
        self._positions = self._positions + 1  # generated text tokens advance all three M-RoPE axes
        x = self._lm.embed_tokens(self._token[:, None])  # (B, 1, D)
        cos_sin = self._lm.rotary_emb(x, self._positions)
        if self._mask is not None:
            self._mask = torch.cat([self._mask, self._mask.new_zeros(len(self._rows), 1, 1, 1)], dim=-1)
        h = run_layers(self._lm.layers, x, self._mask, cos_sin, self._cache)
        self._hidden = self._lm.norm(h[:, -1])


def _penalized(logits: torch.Tensor, penalty) -> torch.Tensor:
    # As RepetitionPenaltyLogitsProcessor: scale seen logits away from zero; penalty 1.0 is exactly a no-op.
    return torch.where(logits < 0, logits * penalty, logits / penalty)


def _cache_length(cache, num_layers: int) -> int:
    assert len(cache.layers) == num_layers, f"a decode cache holds all {num_layers} layers, got {len(cache.layers)}"
    return layer_kv(cache, 0)[0].shape[-2]


def _left_pad(kv: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(kv, (0, 0, length - kv.shape[-2], 0))  # (B, Hkv, T, d) -> (B, Hkv, length, d)


def _set_layer_kv(cache, i: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace layer i's tensors of an initialised cache layer (the attributes `layer_kv` reads)."""
    layer = cache.layers[i]
    layer.keys, layer.values = keys, values


def _padding_mask(pads: list[int], length: int, dtype, device) -> torch.Tensor | None:
    """Additive (B, 1, 1, length) mask hiding each row's `pad` leftmost cache columns; None without padding."""
    if not any(pads):
        return None
    hidden = torch.arange(length, device=device)[None, :] < torch.tensor(pads, device=device)[:, None]
    mask = torch.zeros(len(pads), length, dtype=dtype, device=device)
    return mask.masked_fill_(hidden, torch.finfo(dtype).min)[:, None, None]

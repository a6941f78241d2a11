"""Stage 5: finish the plain prefill (layers K..N-1) and greedy-decode from a cache.

Decoding honours the checkpoint's `generation_config.json`: eos ids and `repetition_penalty` (applied,
as `generate` does, over the original prompt ids plus the generated ids). Sampling is not offered:
Q-Zoom's accuracy figures are greedy.
"""

from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from .coarse import causal_mask, run_layers
from .types import CoarseState

__all__ = ["finish_prefill", "greedy_decode", "eos_ids"]


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
    produced, is included (as in `generate` output).
    """
    lm = model.model.language_model
    stop = eos_ids(model)
    penalty = model.generation_config.repetition_penalty if repetition_penalty is None else repetition_penalty
    processor = RepetitionPenaltyLogitsProcessor(penalty) if penalty not in (None, 1.0) else None
    seen = prompt_ids.to(last_hidden.device)
    out: list[int] = []
    hidden = last_hidden
    position = last_position
    for _ in range(max_new_tokens):
        logits = model.lm_head(hidden).float()  # (1, V)
        if processor is not None:
            logits = processor(seen, logits)
        token = int(logits.argmax(-1))
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            break
        token_t = torch.tensor([[token]], device=seen.device)
        seen = torch.cat([seen, token_t], dim=1)
        position = position + 1
        x = lm.embed_tokens(token_t)
        cs = lm.rotary_emb(x, position)
        h = run_layers(lm.layers, x, causal_mask(1, 1, x.dtype, x.device), cs, cache)
        hidden = lm.norm(h[:, -1])
    return out

"""Stage 2: decide whether the coarse view suffices (paper §3.3, the dynamic gate).

Two gates, one meaning: the score is the probability that zooming is needed, and the zoom route is
taken when score >= threshold.
- `trained_gate_scores`: the Q-Zoom gate branch (`gate_layers` + `gate_head`) on the last prompt token,
  for a batch of pass-1 states in one left-padded call (`trained_gate_score`: one state).
- `confidence_gate_score`: for plain Qwen2.5-VL weights with no gate branch, 1 - p(top first answer
  token) from the ordinary direct prefill. A model that is unsure of its first answer token from the
  coarse view asks for the zoom. Default threshold for this rule: 0.5 (see `DEFAULT_CONFIDENCE_THRESHOLD`).
"""

from __future__ import annotations

import torch

from .coarse import left_padded
from .types import CoarseState

__all__ = ["trained_gate_scores", "trained_gate_score", "confidence_gate_score", "DEFAULT_CONFIDENCE_THRESHOLD"]

DEFAULT_CONFIDENCE_THRESHOLD = 0.5


@torch.no_grad()
def trained_gate_scores(branches, states: list[CoarseState]) -> list[float]:
    """One gate probability per state; left padding puts every last prompt token at index -1."""
    batch = left_padded(states)
    return branches.gate_score(batch.h_k, batch.mask, batch.position_embeddings).tolist()


def trained_gate_score(branches, state: CoarseState) -> float:
    return trained_gate_scores(branches, [state])[0]


@torch.no_grad()
def confidence_gate_score(first_logits: torch.Tensor) -> float:
    """1 - max softmax probability of the first answer token; first_logits: (1, V)."""
    return float(1.0 - torch.softmax(first_logits.float(), dim=-1).max())

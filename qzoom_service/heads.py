"""The Q-Zoom branch modules: the SD-RPN and the dynamic gate (paper §3.2-3.3).

Both branches are stacks of transformers' own `Qwen2_5_VLDecoderLayer` fed with the residual stream
after trunk layer K-1 (0-based: the input of trunk layer K, `branch_layer`). They never read or write
the KV cache. The released checkpoints' tensor names are mapped to these modules in `released.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, apply_rotary_pos_emb

__all__ = ["QZoomBranches", "last_token_qk", "last_token_qk_batch"]


class QZoomBranches(nn.Module):
    """Holds the SD-RPN and gate branches. Either may be absent (plain Qwen2.5-VL weights).

    One trunk prefix (layers 0..K-1) serves both, so they share `branch_layer`; their own layers are
    initialised from trunk layers K.. (`init_from_trunk`).
    """

    def __init__(self, text_config, branch_layer: int | None, rpn_depth: int, gate_depth: int):
        super().__init__()
        self.branch_layer = branch_layer if rpn_depth or gate_depth else None
        k = self.branch_layer
        self.rpn_layers = nn.ModuleList([Qwen2_5_VLDecoderLayer(text_config, k + i) for i in range(rpn_depth)])
        self.gate_layers = nn.ModuleList([Qwen2_5_VLDecoderLayer(text_config, k + i) for i in range(gate_depth)])
        self.gate_head = nn.Linear(text_config.hidden_size, 1, bias=True) if gate_depth else None

    @classmethod
    def create(cls, text_config, *, branch_layer: int | None = None, rpn_depth: int = 0,
               gate_depth: int = 0) -> "QZoomBranches":
        n = text_config.num_hidden_layers
        if (rpn_depth or gate_depth) and not (branch_layer is not None and 0 < branch_layer < n):
            raise ValueError(f"Q-Zoom branches need 0 < branch_layer < {n}; got {branch_layer}")
        if rpn_depth < 0 or gate_depth < 0:
            raise ValueError(f"branch depths must be >= 0; got rpn_depth={rpn_depth}, gate_depth={gate_depth}")
        return cls(text_config, branch_layer, rpn_depth, gate_depth)

    @property
    def has_rpn(self) -> bool:
        return len(self.rpn_layers) > 0

    @property
    def has_gate(self) -> bool:
        return self.gate_head is not None

    @property
    def rpn_depth(self) -> int:
        return len(self.rpn_layers)

    @property
    def gate_depth(self) -> int:
        return len(self.gate_layers)

    def init_from_trunk(self, trunk_layers: nn.ModuleList) -> None:
        """Copy trunk layers K+i into branch layer i (the stage-1 / stage-3 initialisation)."""
        for layers in (self.rpn_layers, self.gate_layers):
            for i, layer in enumerate(layers):
                layer.load_state_dict(trunk_layers[self.branch_layer + i].state_dict())

    def gate_logit(self, h_k: torch.Tensor, mask, position_embeddings) -> torch.Tensor:
        """Pre-sigmoid gate output (B,), float32; what stage-3 training puts into BCE-with-logits."""
        g = h_k
        for layer in self.gate_layers:
            g = layer(g, attention_mask=mask, position_embeddings=position_embeddings)
        # Last prompt token, no final norm (as trained).
        return self.gate_head(g[:, -1]).float().squeeze(-1)

    def gate_score(self, h_k: torch.Tensor, mask, position_embeddings) -> torch.Tensor:
        """Probability that the coarse view is NOT enough (zoom wanted). h_k: (B, L, D) -> (B,)."""
        return torch.sigmoid(self.gate_logit(h_k, mask, position_embeddings))

    def rpn_logits(self, h_k: torch.Tensor, mask, position_embeddings) -> torch.Tensor:
        """Query-key map of each row's last prompt token over every token (SD-RPN, `roi_source="qk"`).

        h_k: (B, L, D) -> raw scaled logits (B, L), mean over heads; the image tokens' entries, through a
        sigmoid, are the per-cell foreground probabilities. The first T-1 RPN layers run fully; of the last
        one only its norm and q/k projections are used.
        """
        r = h_k
        for layer in self.rpn_layers[:-1]:
            r = layer(r, attention_mask=mask, position_embeddings=position_embeddings)
        return last_token_qk_batch(self.rpn_layers[-1], r, position_embeddings).mean(1)


def last_token_qk(layer, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """`last_token_qk_batch` of a single row: hidden (1, L, D) -> (H, L)."""
    return last_token_qk_batch(layer, hidden, position_embeddings)[0]


def last_token_qk_batch(layer, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Scaled attention logits q(last) . k(all) / sqrt(d) of one decoder layer, per head: (B, H, L).

    hidden: (B, L, D), the layer's input (its `input_layernorm` is applied here); RoPE with the given
    (cos, sin); grouped KV heads are repeated to the query heads. Left-padded rows give logits over their
    padding too; callers read only their own tokens.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length = x.shape[:2]
    q = attn.q_proj(x[:, -1:]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)  # (B, H, 1, d)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, L, d)
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    return torch.einsum("bhd,bhld->bhl", q[:, :, 0], k) / math.sqrt(attn.head_dim)

"""The Q-Zoom branch modules: SD-RPN twig layers and the dynamic gate (paper §3.2-3.3).

Both branches are stacks of transformers' own `Qwen2_5_VLDecoderLayer` fed with the residual stream
after trunk layer K-1 (0-based: the input of trunk layer K). They never read or write the KV cache.
Parameter names match the released checkpoints: `twig_layers.{i}.*`, `high_res_layers.{i}.*`,
`high_res_head.{weight,bias}`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer, apply_rotary_pos_emb

__all__ = ["QZoomBranches", "last_token_qk"]


class QZoomBranches(nn.Module):
    """Holds the twig (SD-RPN) and gate branches. Either may be absent (plain Qwen2.5-VL weights)."""

    def __init__(self, text_config, twig_K: int | None, twig_T: int, gate_K: int | None, gate_T: int):
        super().__init__()
        self.twig_K = twig_K
        self.gate_K = gate_K
        self.twig_layers = nn.ModuleList(
            [Qwen2_5_VLDecoderLayer(text_config, twig_K + i) for i in range(twig_T)] if twig_K is not None else []
        )
        self.high_res_layers = nn.ModuleList(
            [Qwen2_5_VLDecoderLayer(text_config, gate_K + i) for i in range(gate_T)] if gate_K is not None else []
        )
        self.high_res_head = nn.Linear(text_config.hidden_size, 1, bias=True) if gate_K is not None else None

    @classmethod
    def create(cls, text_config, *, twig_K=None, twig_T=0, gate_K=None, gate_T=0) -> "QZoomBranches":
        n = text_config.num_hidden_layers
        for name, k, t in (("twig", twig_K, twig_T), ("gate", gate_K, gate_T)):
            if k is not None and not (0 < k < n and t >= 1):
                raise ValueError(f"{name} branch needs 0 < K < {n} layers and T >= 1, got K={k}, T={t}")
        if twig_K is not None and gate_K is not None and twig_K != gate_K:
            # One prefix to K serves both branches; the reference silently skips layers otherwise.
            raise ValueError(f"twig_K ({twig_K}) and high_res_K ({gate_K}) must be equal")
        return cls(text_config, twig_K, twig_T, gate_K, gate_T)

    @property
    def has_twig(self) -> bool:
        return len(self.twig_layers) > 0

    @property
    def has_gate(self) -> bool:
        return self.high_res_head is not None

    @property
    def branch_K(self) -> int | None:
        return self.gate_K if self.gate_K is not None else self.twig_K

    def init_from_trunk(self, trunk_layers: nn.ModuleList) -> None:
        """Copy trunk layers K+i into branch layer i (the stage-1 / stage-3 initialisation)."""
        for k, layers in ((self.twig_K, self.twig_layers), (self.gate_K, self.high_res_layers)):
            for i, layer in enumerate(layers):
                layer.load_state_dict(trunk_layers[k + i].state_dict())

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    def gate_logit(self, h_k: torch.Tensor, mask, position_embeddings) -> torch.Tensor:
        """Pre-sigmoid gate output (B,), float32; what stage-3 training puts into BCE-with-logits."""
        g = h_k
        for layer in self.high_res_layers:
            g = layer(g, attention_mask=mask, position_embeddings=position_embeddings)
        # Last prompt token, no final norm (as trained).
        return self.high_res_head(g[:, -1]).float().squeeze(-1)

    def gate_score(self, h_k: torch.Tensor, mask, position_embeddings) -> torch.Tensor:
        """Probability that the coarse view is NOT enough (zoom wanted). h_k: (B, L, D) -> (B,)."""
        return torch.sigmoid(self.gate_logit(h_k, mask, position_embeddings))

    def rpn_logits(self, h_k: torch.Tensor, mask, position_embeddings, visual_index: torch.Tensor) -> torch.Tensor:
        """Query-key map of the last prompt token over the visual tokens (SD-RPN, `roi_source="qk"`).

        h_k: (1, L, D); visual_index: (Nv,) sequence positions of the image tokens. The first T-1 twig layers
        run fully; of the last one only its norm and q/k projections are used. Returns raw scaled logits
        (Nv,), mean over heads; sigmoid gives the per-cell foreground probability.
        """
        r = h_k
        for layer in self.twig_layers[:-1]:
            r = layer(r, attention_mask=mask, position_embeddings=position_embeddings)
        scores = last_token_qk(self.twig_layers[-1], r, position_embeddings)  # (H, L)
        return scores[:, visual_index].mean(0)


def last_token_qk(layer, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Scaled attention logits q(last) . k(all) / sqrt(d) of one decoder layer, per head: (H, L).

    hidden: (1, L, D), the layer's input (its `input_layernorm` is applied here); RoPE with the given
    (cos, sin); grouped KV heads are repeated to the query heads.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    length = x.shape[1]
    q = attn.q_proj(x[:, -1:]).view(1, 1, -1, attn.head_dim).transpose(1, 2)  # (1, H, 1, d)
    k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)  # (1, Hkv, L, d)
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    return torch.einsum("hd,hld->hl", q[0, :, 0], k[0]) / math.sqrt(attn.head_dim)

"""Plain Qwen2.5-VL weights (no branches): direct and zoom work; auto uses the attention RoI and the
first-token confidence gate."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qzoom_service import attention_roi, gate
from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine
from qzoom_service.model import load_model
from qzoom_service.types import Request

from ..helpers import TINY_BUDGET, make_image


@pytest.fixture(scope="module")
def plain_engine(plain_checkpoint):
    return QZoomEngine(load_model(str(plain_checkpoint)), EngineConfig(max_new_tokens=6, **TINY_BUDGET))


def test_confidence_gate_is_one_minus_top_probability():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    assert gate.confidence_gate_score(logits) == pytest.approx(0.3)


def test_auto_mode_zooms_with_the_attention_roi_when_unsure(plain_engine):
    image = make_image(640, 480, seed=9)
    zoomed = plain_engine.answer([Request(image, "What is in the red box?", RequestOptions(gate_threshold=0.0))])[0]
    assert zoomed.route == "zoom" and zoomed.roi_source == "attention"
    assert 0.0 <= zoomed.gate_score <= 1.0
    peak = torch.tensor(zoomed.roi_map)
    assert peak.max().item() == pytest.approx(1.0)  # the relative map is scaled to its peak
    assert zoomed.roi_box is not None and zoomed.visual_tokens["zoom"] > 0
    direct = plain_engine.answer([Request(image, "What is in the red box?", RequestOptions(gate_threshold=1.0))])[0]
    assert direct.route == "direct" and direct.gate_score == pytest.approx(zoomed.gate_score)
    forced = plain_engine.answer([Request(image, "What is in the red box?", RequestOptions(mode="direct"))])[0]
    assert forced.generated_ids == direct.generated_ids  # the confidence pass reuses the same prefill


def _eager_image_attention(model, state, layer_index: int) -> torch.Tensor:
    """The stock layer's own softmax attention (eager, so it returns weights) of the last token over the image."""
    from qzoom_service.coarse import causal_mask

    layer = model.model.language_model.layers[layer_index]
    config = layer.self_attn.config
    previous, config._attn_implementation = config._attn_implementation, "eager"
    try:
        h = state.h_k
        _, weights = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=state.position_embeddings,
                                     attention_mask=causal_mask(h.shape[1], h.shape[1], h.dtype, h.device))
    finally:
        config._attn_implementation = previous
    return weights[0, :, -1, state.image_start:state.image_start + state.num_visual].mean(0)  # (Nv,)


def test_attention_map_divides_by_the_generic_prompt(plain_engine):
    from qzoom_service.coarse import encode_images, prefill_to_k

    model, k = plain_engine.model, plain_engine.loaded.branch_layer
    p = plain_engine.prepare(Request(make_image(400, 300), "Where is the box?"))
    (emb,) = encode_images(model, p.pixel_values, p.grid_thw)
    state = prefill_to_k(model, p, emb, k)
    generic = replace(p, input_ids=plain_engine.processor.prompt_ids(attention_roi.GENERIC_PROMPT, state.num_visual))
    generic_state = prefill_to_k(model, generic, emb, k)
    got = attention_roi.attention_map(model, state, generic_state, p.merged_hw)

    question, baseline = _eager_image_attention(model, state, k), _eager_image_attention(model, generic_state, k)
    ratio = question / baseline
    assert torch.allclose(got.flatten(), ratio / ratio.max(), atol=1e-4)
    # The division is visible: the map is neither the question's attention alone nor uniform.
    assert not torch.allclose(got.flatten(), question / question.max(), atol=1e-2)
    assert got.min() < 0.9

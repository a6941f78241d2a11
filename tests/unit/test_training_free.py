"""Plain Qwen2.5-VL weights (no branches): direct and zoom work; auto uses the attention RoI and the
first-token confidence gate."""

from __future__ import annotations

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


def test_attention_map_divides_by_the_generic_prompt(plain_engine):
    from qzoom_service.coarse import encode_images, prefill_to_k

    p = plain_engine.prepare(Request(make_image(400, 300), "Where is the box?"))
    (emb,) = encode_images(plain_engine.model, p.pixel_values, p.grid_thw)
    state = prefill_to_k(plain_engine.model, p, emb, plain_engine.loaded.branch_layer)
    same = attention_roi.attention_map(plain_engine.model, state, state, p.merged_hw)
    assert torch.allclose(same, torch.ones_like(same), atol=1e-4)  # question / itself = uniform

"""The engine computes what stock transformers computes: direct route == `generate`, the zoom prefill with
prefix-cache reuse == a from-scratch forward over the fused sequence, batches == single calls."""

from __future__ import annotations

import pytest
import torch

from qzoom_service import rpn, zoom
from qzoom_service.coarse import encode_images, prefill_to_k
from qzoom_service.config import RequestOptions
from qzoom_service.types import Request

from ..helpers import make_image


def _stock_generate(engine, prepared, max_new_tokens):
    model = engine.model
    ids = prepared.input_ids
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=prepared.pixel_values,
        image_grid_thw=prepared.grid_thw,
        mm_token_type_ids=(ids == model.config.image_token_id).int(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    model.model.rope_deltas = None  # generate leaves it on the instance; the engine never reads it
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("size", [(400, 300), (250, 700)])
@pytest.mark.parametrize("mode,gate", [("direct", None), ("auto", 1.0)])
def test_gate_closed_answer_equals_stock_generate_token_for_token(engine, size, mode, gate):
    request = Request(make_image(*size, seed=3), "What colour is the box?",
                      RequestOptions(mode=mode, gate_threshold=gate, max_new_tokens=12))
    result = engine.answer([request])[0]
    assert result.route == "direct"
    expected = _stock_generate(engine, engine.prepare(request), 12)
    assert len(expected) > 1
    assert result.generated_ids == expected


def _zoom_input(engine, request, reuse):
    p = engine.prepare(request)
    (embeds,) = encode_images(engine.model, p.pixel_values, p.grid_thw)
    state = prefill_to_k(engine.model, p, embeds, engine.loaded.branch_layer)
    prob = torch.sigmoid(rpn.roi_logits(engine.branches, state, p.merged_hw).float())
    threshold = float(prob.median())  # roughly half the cells in the foreground: a non-trivial box
    cell_box, box = rpn.map_to_box(prob, threshold, p.original.size, factor=engine.loaded.factor)
    token = engine.loaded.factor**2
    pixel_values, grid = zoom.encode_crop(engine.processor, p.original, box, 64 * token, 144 * token)
    (roi,) = encode_images(engine.model, pixel_values, grid)
    roi_hw = (int(grid[0, 1]) // p.merge_size, int(grid[0, 2]) // p.merge_size)
    return state, zoom.build_zoom_input(state, roi, p.merged_hw, roi_hw, cell_box, reuse)


@pytest.mark.parametrize("reuse", [True, False])
def test_zoom_prefill_with_prefix_reuse_equals_full_forward(engine, reuse):
    request = Request(make_image(640, 480, seed=5), "Which digit is in the red box?")
    with torch.inference_mode():
        state, zin = _zoom_input(engine, request, reuse)
        hidden, cache = zoom.prefill_zoom(engine.model, state, zin)
        fast = engine.model.lm_head(hidden)
        full = zoom.forward_full(engine.model, zin)
    assert zin.num_roi > 0 and zin.embeds.shape[1] == state.embeds.shape[1] + zin.num_roi + 2
    assert cache.get_seq_length() == zin.embeds.shape[1]
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=0)
    assert fast.abs().max() > 1e-3  # a real logit vector, not zeros on both sides


def test_zoom_decode_continues_from_the_fused_cache(engine):
    """Step 2 of the zoom decode equals a from-scratch forward over fused sequence + first token."""
    request = Request(make_image(640, 480, seed=6), "What is written here?")
    with torch.inference_mode():
        state, zin = _zoom_input(engine, request, True)
        hidden, cache = zoom.prefill_zoom(engine.model, state, zin)
        lm = engine.model.model.language_model
        first = int(engine.model.lm_head(hidden).argmax())
        x = lm.embed_tokens(torch.tensor([[first]]))
        pos = zin.positions[:, :, -1:] + 1
        h = x
        for layer in lm.layers:
            h = layer(h, attention_mask=None, cache=cache, use_cache=True,
                      position_embeddings=lm.rotary_emb(x, pos))
        step = engine.model.lm_head(lm.norm(h[:, -1]))
        longer = zoom.ZoomInput(torch.cat([zin.embeds, x], 1), torch.cat([zin.positions, pos], 2), zin.split,
                                zin.num_roi)
        torch.testing.assert_close(step, zoom.forward_full(engine.model, longer), atol=1e-4, rtol=0)


def test_batch_of_three_equals_three_single_calls(engine):
    requests = [
        Request(make_image(400, 300, seed=1), "What is in the box?", RequestOptions(gate_threshold=0.0, roi_threshold=0.5)),
        Request(make_image(700, 260, seed=2), "Read the number.", RequestOptions(mode="direct")),
        Request(make_image(300, 640, seed=3), "What colour?", RequestOptions(mode="zoom", roi_threshold=0.5)),
    ]
    batched = engine.answer(requests)
    singles = [engine.answer([r])[0] for r in requests]
    assert [r.route for r in batched] == ["zoom", "direct", "zoom"]
    for b, s in zip(batched, singles):
        assert (b.route, b.roi_box, b.generated_ids, b.visual_tokens) == (s.route, s.roi_box, s.generated_ids,
                                                                           s.visual_tokens)
        if s.gate_score is not None:
            assert b.gate_score == pytest.approx(s.gate_score, abs=1e-5)
    assert len({r.visual_tokens["coarse"] for r in batched}) == 3  # really different image sizes


def test_cached_coarse_features_skip_the_vision_tower_and_change_nothing(tiny_loaded, monkeypatch):
    from qzoom_service.cache import InProcessCache
    from qzoom_service.config import EngineConfig
    from qzoom_service.engine import QZoomEngine

    from ..helpers import TINY_BUDGET

    engine = QZoomEngine(tiny_loaded, EngineConfig(max_new_tokens=6, **TINY_BUDGET), feature_cache=InProcessCache())
    request = Request(make_image(500, 300, seed=8), "What is it?", RequestOptions(gate_threshold=0.0), image_id="abc")
    cold = engine.answer([request])[0]
    calls = []
    visual = type(engine.model.model.visual)
    original = visual.forward
    monkeypatch.setattr(visual, "forward", lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    warm = engine.answer([request])[0]
    assert (cold.cache_hit, warm.cache_hit) == (False, True)
    assert "vision_coarse" in cold.timings_ms and "vision_coarse" not in warm.timings_ms
    assert calls == [1] * (warm.route == "zoom")  # only the RoI crop goes through the vision tower
    assert (warm.route, warm.roi_box, warm.generated_ids) == (cold.route, cold.roi_box, cold.generated_ids)


def test_route_then_zoom_equals_answer(engine):
    requests = [Request(make_image(640, 480, seed=s), "Which digit?", RequestOptions(gate_threshold=g, roi_threshold=0.5))
                for s, g in ((1, 0.0), (2, 1.0))]
    whole = engine.answer(requests)
    halves = engine.route(requests)
    assert [type(h).__name__ for h in halves] == ["ZoomPlan", "Result"]
    split = [engine.zoom(r, h) if type(h).__name__ == "ZoomPlan" else h for r, h in zip(requests, halves)]
    for a, b in zip(whole, split):
        assert (a.route, a.roi_box, a.generated_ids, a.gate_score) == (b.route, b.roi_box, b.generated_ids, b.gate_score)


def test_left_padded_batch_prefill_equals_single_prefills(engine):
    from qzoom_service.coarse import layer_kv, prefill_batch_to_k

    prepared = [engine.prepare(Request(make_image(w, h, seed=w), q)) for w, h, q in
                ((400, 300, "Short?"), (260, 700, "A much longer question about the picture?"), (640, 200, "Mid?"))]
    assert len({p.input_ids.shape[1] for p in prepared}) == 3  # really padded
    embeds = [encode_images(engine.model, p.pixel_values, p.grid_thw)[0] for p in prepared]
    k = engine.loaded.branch_layer
    with torch.inference_mode():
        batched = prefill_batch_to_k(engine.model, prepared, embeds, k)
        singles = [prefill_to_k(engine.model, p, e, k) for p, e in zip(prepared, embeds)]
    for b, s in zip(batched, singles):
        assert b.h_k.shape == s.h_k.shape and (b.image_start, b.num_visual) == (s.image_start, s.num_visual)
        torch.testing.assert_close(b.h_k, s.h_k, atol=1e-4, rtol=0)
        assert torch.equal(b.positions, s.positions)
        for i in range(k):
            torch.testing.assert_close(layer_kv(b.cache, i)[0], layer_kv(s.cache, i)[0], atol=1e-4, rtol=0)


def test_repetition_penalty_comes_from_generation_config_unless_overridden(engine):
    assert engine.model.generation_config.repetition_penalty == 1.05
    image = make_image(400, 300, seed=12)
    default = engine.answer([Request(image, "Say it.", RequestOptions(mode="direct", max_new_tokens=16))])[0]
    same = engine.answer([Request(image, "Say it.", RequestOptions(mode="direct", max_new_tokens=16,
                                                                   repetition_penalty=1.05))])[0]
    strong = engine.answer([Request(image, "Say it.", RequestOptions(mode="direct", max_new_tokens=16,
                                                                     repetition_penalty=0.2))])[0]
    assert default.generated_ids == same.generated_ids != strong.generated_ids

"""Every stage runs once per batch, and a batch computes what single calls compute: same routes, boxes and
tokens, gate scores and RoI maps within 1e-5 (fp32), for mixed image sizes, routes, modes and answer lengths,
under both position schemes."""

from __future__ import annotations

import pytest
import torch

from qzoom_service import decode, gate, rpn, zoom
from qzoom_service.coarse import encode_images, layer_kv, prefill_batch_to_k, prefill_rest, span_mask
from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine
from qzoom_service.types import Request

from ..helpers import TINY_BUDGET, make_image


def _mixed_requests():
    """Five rows: zoom forced, direct forced, auto open, auto closed, zoom forced; five image sizes."""
    return [
        Request(make_image(400, 300, seed=1), "What is in the box?", RequestOptions(mode="zoom", roi_threshold=0.5,
                                                                                     max_new_tokens=7)),
        Request(make_image(700, 260, seed=2), "Read the number, please.", RequestOptions(mode="direct",
                                                                                          max_new_tokens=3)),
        Request(make_image(300, 640, seed=3), "Colour?", RequestOptions(gate_threshold=0.0, roi_threshold=0.5,
                                                                        max_new_tokens=5)),
        Request(make_image(520, 520, seed=4), "Which digit is shown at the top left?",
                RequestOptions(gate_threshold=1.0, max_new_tokens=8)),
        Request(make_image(640, 200, seed=5), "Name it.", RequestOptions(mode="zoom", roi_threshold=0.4,
                                                                         max_new_tokens=6)),
    ]


def _assert_same(batched, singles):
    for b, s in zip(batched, singles):
        assert (b.route, b.roi_box, b.roi_source, b.generated_ids, b.visual_tokens) == (
            s.route, s.roi_box, s.roi_source, s.generated_ids, s.visual_tokens)
        assert (b.gate_score is None) == (s.gate_score is None)
        if s.gate_score is not None:
            assert b.gate_score == pytest.approx(s.gate_score, abs=1e-5)
        assert (b.roi_map is None) == (s.roi_map is None)
        if s.roi_map is not None:
            torch.testing.assert_close(torch.tensor(b.roi_map), torch.tensor(s.roi_map), atol=1e-5, rtol=0)


@pytest.mark.parametrize("reuse", [True, False])
def test_mixed_batch_equals_single_calls_under_both_position_schemes(tiny_loaded, reuse):
    engine = QZoomEngine(tiny_loaded, EngineConfig(max_new_tokens=8, reuse_src_pos=reuse, **TINY_BUDGET))
    requests = _mixed_requests()
    batched = engine.answer(requests)
    singles = [engine.answer([r])[0] for r in requests]
    assert [r.route for r in batched] == ["zoom", "direct", "zoom", "direct", "zoom"]
    assert len({r.visual_tokens["coarse"] for r in batched}) == 5  # really different image sizes
    assert len({len(r.generated_ids) for r in batched}) > 1  # really different answer lengths
    _assert_same(batched, singles)


def test_each_stage_runs_once_per_batch(engine, monkeypatch):
    """Two vision-tower calls (coarse images, crops), one gate call, one RPN call, and two multi-token passes
    of the last trunk layer (the direct rows' rest, the zooming rows' fused prefill); decoding steps are one token."""
    calls = {"visual": 0, "gate": 0, "rpn": 0, "prefill": 0}

    def count(module, key, only_prefill=False):
        original = module.forward

        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if not only_prefill or hidden.shape[1] > 1:
                calls[key] += 1
                assert key in ("visual", "prefill") or hidden.shape[0] > 1  # the branches see the whole batch
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "forward", forward)

    count(engine.model.model.visual, "visual")
    count(engine.branches.gate_layers[0], "gate")
    count(engine.branches.rpn_layers[0], "rpn")
    count(engine.model.model.language_model.layers[-1], "prefill", only_prefill=True)
    results = engine.answer(_mixed_requests())
    assert [r.route for r in results].count("zoom") == 3
    assert calls == {"visual": 2, "gate": 1, "rpn": 1, "prefill": 2}


def test_batched_timings_share_each_stage_and_follow_the_route(engine):
    results = engine.answer(_mixed_requests())
    assert len({r.timings_ms["prefill_k"] for r in results}) == 1  # one pass 1, shared equally
    for r in results:
        zoomed = r.route == "zoom"
        assert ("zoom_prefill" in r.timings_ms, "prefill_rest" in r.timings_ms) == (zoomed, not zoomed)
        assert r.timings_ms["total"] == pytest.approx(sum(v for k, v in r.timings_ms.items() if k != "total"))


def _states(engine, sizes):
    prepared = [engine.prepare(Request(make_image(w, h, seed=w), q)) for w, h, q in sizes]
    assert len({p.input_ids.shape[1] for p in prepared}) == len(prepared)  # really padded
    embeds = [encode_images(engine.model, p.pixel_values, p.grid_thw)[0] for p in prepared]
    singles = [prefill_batch_to_k(engine.model, [p], [e], engine.loaded.branch_layer)[0]
               for p, e in zip(prepared, embeds)]
    return prepared, singles


_SIZES = ((400, 300, "Short?"), (260, 700, "A much longer question about the picture?"), (640, 200, "Mid?"))


def test_batched_gate_and_rpn_equal_single_rows(engine):
    with torch.inference_mode():
        prepared, states = _states(engine, _SIZES)
        scores = gate.trained_gate_scores(engine.branches, states)
        maps = rpn.roi_logits_batch(engine.branches, states, [p.merged_hw for p in prepared])
        for state, p, score, got in zip(states, prepared, scores, maps):
            assert score == pytest.approx(gate.trained_gate_score(engine.branches, state), abs=1e-5)
            alone = rpn.roi_logits(engine.branches, state, p.merged_hw)
            assert got.shape == alone.shape == p.merged_hw
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    assert len({round(s, 4) for s in scores}) == len(scores)  # distinct rows, not one row repeated


def test_plain_prefill_rest_in_a_batch_equals_finish_prefill(engine):
    with torch.inference_mode():
        _, states = _states(engine, _SIZES)
        lengths = [s.h_k.shape[1] for s in states]
        batched = prefill_rest(engine.model, states, [s.embeds for s in states], [s.positions for s in states],
                               lengths)
        for state, length, (hidden, cache) in zip(states, lengths, batched):
            assert cache.get_seq_length() == length
            expected = decode.finish_prefill(engine.model, state)  # the independent per-row implementation
            torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=0)
            for i in range(len(engine.model.model.language_model.layers)):
                torch.testing.assert_close(layer_kv(cache, i)[1], layer_kv(state.cache, i)[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("reuse", [True, False])
def test_fused_prefill_in_a_batch_equals_a_full_forward_per_row(engine, reuse):
    with torch.inference_mode():
        prepared, states = _states(engine, _SIZES)
        factor, zins = engine.loaded.factor, []
        for p, state, (x0, y0) in zip(prepared, states, ((0, 0), (1, 2), (3, 1))):
            box = (x0 * factor, y0 * factor, (x0 + 5) * factor, (y0 + 4 + x0) * factor)  # crop sizes differ by row
            pixel_values, grid = zoom.encode_crop(engine.processor, p.original, box, TINY_BUDGET["min_pixels"],
                                                  TINY_BUDGET["max_pixels"])
            (roi,) = encode_images(engine.model, pixel_values, grid)
            roi_hw = (int(grid[0, 1]) // p.merge_size, int(grid[0, 2]) // p.merge_size)
            cell_box = rpn.original_to_cell_box(box, p.merged_hw, p.original.size)
            zins.append(zoom.build_zoom_input(state, roi, p.merged_hw, roi_hw, cell_box, reuse))
        assert len({z.num_roi for z in zins}) > 1 and len({z.split for z in zins}) > 1
        batched = zoom.prefill_zoom_batch(engine.model, states, zins)
        for zin, (hidden, cache) in zip(zins, batched):
            assert cache.get_seq_length() == zin.embeds.shape[1]
            torch.testing.assert_close(engine.model.lm_head(hidden), zoom.forward_full(engine.model, zin),
                                       atol=1e-4, rtol=0)


def test_span_mask_hides_keys_outside_each_row_and_the_future():
    mask = span_mask([(1, 4), (0, 2)], q_len=2, kv_len=4, dtype=torch.float32, device="cpu")
    seen = (mask == 0).int()[:, 0]
    # Queries are the last two key positions (2, 3); row 0 sees keys 1..3, row 1 keys 0..1.
    assert seen.tolist() == [[[0, 1, 1, 0], [0, 1, 1, 1]], [[1, 1, 0, 0], [1, 1, 0, 0]]]


def test_training_free_batch_equals_single_calls(plain_checkpoint):
    from qzoom_service.model import load_model

    engine = QZoomEngine(load_model(str(plain_checkpoint)), EngineConfig(max_new_tokens=6, **TINY_BUDGET))
    requests = [
        Request(make_image(640, 480, seed=9), "What is in the red box?", RequestOptions(gate_threshold=0.0)),
        Request(make_image(300, 500, seed=10), "Colour?", RequestOptions(gate_threshold=1.0, max_new_tokens=4)),
        Request(make_image(500, 260, seed=11), "Read it.", RequestOptions(mode="zoom")),
        Request(make_image(420, 420, seed=12), "Say it.", RequestOptions(mode="direct")),
    ]
    batched = engine.answer(requests)
    assert [r.route for r in batched] == ["zoom", "direct", "zoom", "direct"]
    assert {r.roi_source for r in batched} == {"attention", None}
    _assert_same(batched, [engine.answer([r])[0] for r in requests])

"""`zoom_batch` computes what single `zoom` calls compute, for routed plans (features travelled) and explicit
boxes (features looked up or encoded here) mixed in one batch, with one vision-tower call per kind of input."""

from __future__ import annotations

import pytest

from qzoom_service.cache import InProcessCache
from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine, ZoomPlan, for_zoom
from qzoom_service.types import Request

from ..helpers import TINY_BUDGET, make_image

OPTIONS = RequestOptions(gate_threshold=0.0, roi_threshold=0.5, max_new_tokens=6)


@pytest.fixture
def zoom_engine(tiny_loaded):
    return QZoomEngine(tiny_loaded, EngineConfig(max_new_tokens=6, **TINY_BUDGET), feature_cache=InProcessCache())


def _items(engine):
    """Two routed plans and two explicit boxes, four image sizes."""
    items = []
    for seed, (w, h) in enumerate([(640, 480), (300, 520)], start=1):
        prepared = engine.prepare(Request(make_image(w, h, seed=seed), "Which digit?", OPTIONS, image_id=f"r{seed}"))
        (plan,) = engine.route([prepared])
        assert isinstance(plan, ZoomPlan) and plan.coarse is not None
        items.append((for_zoom(prepared), plan))
    for seed, (w, h), box in [(3, (700, 260), (10, 10, 300, 200)), (4, (420, 420), (100, 50, 400, 380))]:
        prepared = engine.prepare(Request(make_image(w, h, seed=seed), "Colour?", OPTIONS))
        items.append((prepared, engine.plan_for_box(prepared, box)))
    return items


def test_a_zoom_batch_equals_single_zoom_calls(zoom_engine):
    items = _items(zoom_engine)
    batched = zoom_engine.zoom_batch(items)
    singles = [zoom_engine.zoom(request, plan) for request, plan in items]
    assert len({r.visual_tokens["coarse"] for r in batched}) == 4  # really different sizes
    for b, s in zip(batched, singles):
        assert b.route == s.route == "zoom"
        assert (b.roi_box, b.roi_source, b.generated_ids, b.visual_tokens, b.cache_hit) == (
            s.roi_box, s.roi_source, s.generated_ids, s.visual_tokens, s.cache_hit)
    assert [r.roi_source for r in batched] == ["sd_rpn", "sd_rpn", "explicit", "explicit"]


def test_a_zoom_batch_runs_the_vision_tower_once_for_its_own_coarse_images_and_once_for_the_crops(
        zoom_engine, tiny_loaded, monkeypatch):
    items = _items(zoom_engine)
    calls = []
    visual = type(tiny_loaded.model.model.visual)
    original = visual.forward
    monkeypatch.setattr(visual, "forward", lambda self, pixels, *a, **k: (calls.append(pixels.shape[0]),
                                                                          original(self, pixels, *a, **k))[1])
    results = zoom_engine.zoom_batch(items)
    assert len(calls) == 2  # the two explicit boxes' coarse images together, then all four crops together
    assert [r.cache_hit for r in results][2:] == [False, False]
    assert all("coarse.vision_coarse" in r.timings_ms for r in results[:2])
    assert all("vision_coarse" in r.timings_ms for r in results[2:])


def test_a_zoom_batch_over_max_batch_size_is_refused(zoom_engine):
    from qzoom_service.errors import InvalidInput
    prepared = zoom_engine.prepare(Request(make_image(300, 300), "Colour?", OPTIONS))
    plan = zoom_engine.plan_for_box(prepared, (0, 0, 200, 200))
    with pytest.raises(InvalidInput, match="max_batch_size"):
        zoom_engine.zoom_batch([(prepared, plan)] * (zoom_engine.config.max_batch_size + 1))

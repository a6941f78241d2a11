"""The coarse -> zoom hand-off between two engines (as between the CoarseGate and Zoom replicas, each with
its own in-process cache): the zoom side runs no coarse vision tower, and `cache_hit` and the timings say
what really happened."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest

from qzoom_service.cache import InProcessCache
from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine, ZoomPlan, for_zoom
from qzoom_service.types import Request

from ..helpers import TINY_BUDGET, make_image

OPTIONS = RequestOptions(gate_threshold=0.0, roi_threshold=0.5)


@pytest.fixture
def replicas(tiny_loaded):
    """(coarse engine, zoom engine): one model, two caches, as two replicas without Redis."""
    config = EngineConfig(max_new_tokens=6, **TINY_BUDGET)
    return (QZoomEngine(tiny_loaded, config, feature_cache=InProcessCache()),
            QZoomEngine(tiny_loaded, config, feature_cache=InProcessCache()))


@pytest.fixture
def vision_calls(tiny_loaded, monkeypatch):
    """Images per vision-tower call (patch rows of each call's input)."""
    calls = []
    visual = type(tiny_loaded.model.model.visual)
    original = visual.forward
    monkeypatch.setattr(visual, "forward", lambda self, pixels, *a, **k: (calls.append(pixels.shape[0]),
                                                                          original(self, pixels, *a, **k))[1])
    return calls


def _route(engine, seed=5):
    request = Request(make_image(640, 480, seed=seed), "Which digit?", OPTIONS, image_id=f"img-{seed}")
    prepared = engine.prepare(request)
    (plan,) = engine.route([prepared])
    assert isinstance(plan, ZoomPlan) and plan.coarse is not None
    return prepared, plan


def test_a_routed_plan_zooms_on_another_replica_without_the_coarse_vision_tower(replicas, vision_calls):
    coarse, zoom = replicas
    prepared, plan = _route(coarse)
    assert plan.cache_hit is False and len(vision_calls) == 1
    result = zoom.zoom(for_zoom(prepared), plan)
    assert len(vision_calls) == 2  # the RoI crop only
    assert result.cache_hit is False and result.route == "zoom"
    assert "vision_coarse" not in result.timings_ms and "coarse.vision_coarse" in result.timings_ms
    whole = coarse.answer([Request(prepared.original, "Which digit?", OPTIONS)])[0]
    assert (result.roi_box, result.generated_ids) == (whole.roi_box, whole.generated_ids)


def test_the_zoom_replica_reports_the_coarse_pass_hit_it_was_handed(replicas, vision_calls):
    coarse, zoom = replicas
    _route(coarse)
    prepared, warm = _route(coarse)  # the coarse replica's cache now has the features
    assert warm.cache_hit is True and "vision_coarse" not in dict(warm.timings_ms)
    result = zoom.zoom(for_zoom(prepared), warm)
    assert result.cache_hit is True and len(vision_calls) == 2  # one coarse encode in all, plus one RoI crop


def test_without_the_features_the_zoom_replica_reports_its_own_miss_and_encode(replicas, vision_calls):
    coarse, zoom = replicas
    _route(coarse)
    prepared, warm = _route(coarse)
    result = zoom.zoom(prepared, replace(warm, coarse=None))
    assert result.cache_hit is False and "vision_coarse" in result.timings_ms  # not the coarse pass's True
    box = zoom.zoom(prepared, zoom.plan_for_box(prepared, (100, 100, 300, 300)))
    assert box.cache_hit is True and "vision_coarse" not in box.timings_ms  # its own cache, filled just now


def test_features_of_another_request_are_refused(replicas):
    coarse, zoom = replicas
    _, plan = _route(coarse)
    other = zoom.prepare(Request(make_image(300, 700, seed=2), "Which digit?", OPTIONS))
    with pytest.raises(ValueError, match="not of this request"):
        zoom.zoom(other, plan)


def test_what_travels_is_the_request_without_its_coarse_pixels(replicas):
    coarse, _ = replicas
    prepared, plan = _route(coarse)
    slim = for_zoom(prepared)
    full_bytes, slim_bytes = len(pickle.dumps(prepared)), len(pickle.dumps(slim))
    assert full_bytes - slim_bytes >= 0.95 * prepared.pixel_values.nbytes
    assert slim.original is prepared.original and slim.input_ids is prepared.input_ids
    assert len(pickle.dumps(plan)) < 2 * plan.coarse.embeds.nbytes + 64_000  # features + map, nothing more

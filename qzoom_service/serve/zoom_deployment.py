"""`Zoom`: the RoI re-encode and re-decode, for zoom plans from `CoarseGate` and explicit boxes.

A routed plan arrives with the prepared request (the image decoded once, in the ingress) and the coarse
features, so the coarse prefix is rebuilt without the vision tower and without receiving layer 0..K-1
K/V over the network. An explicit box arrives with the decoded image; its coarse features come from the
cache or the vision tower here. Batch 1 per request. Its own metrics (serve/metrics.py) carry
`deployment="Zoom"`: each call's latency and status, and its cache's operations.
"""

from __future__ import annotations

import logging
import time

from ray import serve

from ..engine import ZoomPlan
from ..errors import QZoomError
from ..types import Box, Prepared, Request, Result
from .health import HealthState
from .metrics import ServiceMetrics
from .servicer import answer_box
from .settings import AppSettings, build_engine

__all__ = ["Zoom"]

log = logging.getLogger("ray.serve")


@serve.deployment(name="Zoom", ray_actor_options={"num_cpus": 0.5})
class Zoom:
    def __init__(self, settings: dict):
        self.settings = AppSettings.from_dict(settings)
        self.engine, self.cache = build_engine(self.settings)
        self.metrics, self.health = ServiceMetrics(), HealthState()

    def zoom(self, prepared: Prepared, plan: ZoomPlan) -> Result:
        return self._measured("zoom", lambda: self.engine.zoom(prepared, plan))

    def answer_box(self, request: Request, box: Box) -> Result:
        return self._measured("answer_box", lambda: answer_box(self.engine, request, box))

    def check_health(self):
        """Ray's replica health check: after a fatal error Ray replaces this replica."""
        if not self.health.serving:
            raise RuntimeError(f"Zoom replica cannot serve: {self.health.fatal}")

    def _measured(self, method: str, work) -> Result:
        started, code = time.perf_counter(), "OK"
        try:
            return work()
        except QZoomError as e:  # travels to the ingress, which answers it with its code
            code = e.code
            raise
        except Exception as e:
            code = "INTERNAL"
            self.health.note_failure(e)
            raise
        finally:
            self.metrics.record_request(method, code, time.perf_counter() - started)
            self.metrics.record_cache_stats(self.cache.stats())

"""`Zoom`: the RoI re-encode and re-decode, for zoom plans from `CoarseGate` and explicit boxes.

A routed plan arrives with the prepared request (the image decoded once, in the ingress) and the coarse
features, so the coarse prefix is rebuilt without the vision tower and without receiving layer 0..K-1
K/V over the network. An explicit box arrives with the decoded image; its coarse features come from the
cache or the vision tower here. Both kinds share one dynamic batch (`batching.QueueBatcher` over
`engine.zoom_batch`), bounded by count and coarse visual tokens. Its own metrics (serve/metrics.py) carry
`deployment="Zoom"`: each call's latency and status, and its cache's operations.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from ..engine import ZoomPlan
from ..errors import QZoomError
from ..types import Box, Prepared, Request, Result
from .batching import QueueBatcher, coarse_tokens
from .health import HealthState
from .metrics import ServiceMetrics
from .settings import AppSettings, build_engine

__all__ = ["Zoom"]

log = logging.getLogger("ray.serve")


# max_ongoing_requests: Ray's default (5) would cap a batch at 5.
@serve.deployment(name="Zoom", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Zoom:
    def __init__(self, settings: dict):
        self.settings = AppSettings.from_dict(settings)
        self.engine, self.cache = build_engine(self.settings)
        self.metrics, self.health = ServiceMetrics(), HealthState()
        self.batcher = QueueBatcher(
            self.engine.zoom_batch, max_batch_size=self.settings.engine.max_batch_size,
            max_cost=self.settings.max_batch_visual_tokens, cost=lambda item: coarse_tokens(item[0]),
            wait_s=self.settings.batch_wait_timeout_s)

    async def zoom(self, prepared: Prepared, plan: ZoomPlan) -> Result:
        return await self._measured("zoom", self.batcher((prepared, plan)))

    async def answer_box(self, request: Request, box: Box) -> Result:
        """A question about an explicit box (original pixels): its plan here, the coarse and zoom passes batched."""
        return await self._measured("answer_box", self._box_plan_then_zoom(request, box))

    def check_health(self):
        """Ray's replica health check: after a fatal error Ray replaces this replica."""
        if not self.health.serving:
            raise RuntimeError(f"Zoom replica cannot serve: {self.health.fatal}")

    async def _box_plan_then_zoom(self, request: Request, box: Box) -> Result:
        prepared = await asyncio.to_thread(self.engine.prepare, request)
        return await self.batcher((prepared, self.engine.plan_for_box(prepared, box)))

    async def _measured(self, method: str, work) -> Result:
        started, code = time.perf_counter(), "OK"
        try:
            return await work
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

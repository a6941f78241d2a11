"""`CoarseGate`: the gRPC ingress deployment, a thin Ray wrapper around `QZoomServicer` (servicer.py).

It answers the direct route itself and hands zoom plans to the `Zoom` deployment, so the cheap pass
and the RoI re-decode scale apart. Method names equal the RPC names (Ray Serve dispatches on them), those
of `grpc.health.v1.Health` (`Check`, `Watch`) included. What is the deployment's stays here: dynamic
batching of the coarse pass (`batching.QueueBatcher`; why not `serve.batch`: see batching.py), the Zoom
handle, turning its exceptions (a typed error wrapped in a RayTaskError, a full queue's BackPressureError)
into typed errors, and Ray's replica health check.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from ..errors import Overloaded, QZoomError
from .batching import QueueBatcher, coarse_tokens
from .metrics import ServiceMetrics
from .servicer import QZoomServicer
from .settings import AppSettings, build_engine

__all__ = ["CoarseGate"]

log = logging.getLogger("ray.serve")


# max_ongoing_requests: Ray's default (5) would cap a batch at 5 and queue the rest in the proxy.
@serve.deployment(name="CoarseGate", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class CoarseGate:
    def __init__(self, zoom_handle, settings: dict):
        self.settings = AppSettings.from_dict(settings)
        engine, cache = build_engine(self.settings)
        self.zoom = zoom_handle
        # Dynamic batching of the coarse pass: one vision-tower call for the batch's cache misses.
        self.route_batcher = QueueBatcher(
            engine.route, max_batch_size=self.settings.engine.max_batch_size,
            max_cost=self.settings.max_batch_visual_tokens, cost=coarse_tokens,
            wait_s=self.settings.batch_wait_timeout_s)
        self.servicer = QZoomServicer(
            engine, cache, zoom_plan=self._zoom_plan, answer_box=self._answer_box, route=self.route_batcher,
            api_keys=self.settings.api_keys(), max_crops_per_image=self.settings.max_crops_per_image,
            metrics=ServiceMetrics(),
        )
        log.info("CoarseGate ready: model %s, cache %s, auth %s", engine.loaded.model_id, cache.backend,
                 "on" if self.servicer.api_keys else "off")

    # -- RPCs (Ray passes the gRPC context as `grpc_context`) -----------------------------------------

    async def UploadImage(self, request, grpc_context=None):
        return await self.servicer.UploadImage(request, grpc_context)

    async def Answer(self, request, grpc_context=None):
        return await self.servicer.Answer(request, grpc_context)

    async def ZoomRegion(self, request, grpc_context=None):
        return await self.servicer.ZoomRegion(request, grpc_context)

    async def Health(self, request, grpc_context=None):
        return await self.servicer.Health(request, grpc_context)

    # grpc.health.v1.Health: the proxy routes it here too (one app: always; several: by `application`).

    async def Check(self, request, grpc_context=None):
        return await self.servicer.Check(request, grpc_context)

    async def Watch(self, request, grpc_context=None):
        async for response in self.servicer.Watch(request, grpc_context):
            yield response

    def check_health(self):
        """Ray's replica health check: after a fatal error Ray replaces this replica."""
        if not self.servicer.health.serving:
            raise RuntimeError(f"CoarseGate replica cannot serve: {self.servicer.health.fatal}")

    # -- what the servicer calls --------------------------------------------------------------------

    async def _zoom_plan(self, prepared, plan):
        return await _typed(self.zoom.zoom.remote(prepared, plan))

    async def _answer_box(self, request, box):
        return await _typed(self.zoom.answer_box.remote(request, box))


async def _typed(response):
    """Await a Zoom call; its typed errors arrive wrapped in a RayTaskError, a full queue as BackPressureError."""
    try:
        return await response
    except BackPressureError:
        raise Overloaded("the zoom pool is at capacity; retry shortly") from None
    except RayTaskError as e:
        if isinstance(e.cause, QZoomError):
            raise e.cause from None
        raise

"""The `qzoom.v1.QZoomService` methods as a plain class: an engine, a store and zoom callables in, protobuf
out. No Ray here: the `CoarseGate` deployment is a thin wrapper around it, and tests (or a one-process gRPC
server) use it directly, its methods having gRPC's `(request, context)` servicer signature.

It validates, checks the API key, keeps image and crop handles in the store, runs the coarse pass and the
gate itself (through `route`) and hands zoom plans and explicit boxes to the zoom callables. Errors become
gRPC statuses here and only here (`rpc`); the servicer keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
import uuid
from typing import Awaitable, Callable

import grpc
from qzoom_client.coords import input_size_for

from .. import __version__, crops
from ..engine import ZoomPlan, for_zoom
from ..errors import ImageTooLarge, InvalidInput, NotFound, QZoomError, Unauthenticated, Unavailable
from ..preprocess import load_image
from ..types import Box, Prepared, Request, Result
from . import codec
from .auth import check_api_key
from .health import SERVICES, HealthState

__all__ = ["QZoomServicer", "in_process", "answer_box"]

_IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # hashlib.sha256(image bytes).hexdigest()

log = logging.getLogger("ray.serve")  # the logger Ray Serve writes to replica logs; plain logging elsewhere

RouteFn = Callable[[Prepared], Awaitable["Result | ZoomPlan"]]  # the coarse pass + gate (+ direct answer)
ZoomPlanFn = Callable[[Prepared, ZoomPlan], Awaitable[Result]]  # the zoom pass of a routed plan
AnswerBoxFn = Callable[[Request, Box], Awaitable[Result]]  # a question about an explicit box


def rpc(auth: bool = True):
    """The error-to-status boundary: typed errors keep their code and message, anything unexpected is
    logged with a request id and answered INTERNAL. `auth=False` only for Health: probes send no key."""

    def wrap(method):
        name = method.__name__

        @functools.wraps(method)
        async def handler(self, request, context=None):
            started = time.perf_counter()
            try:
                if auth:
                    self._authenticate(context)
                response = await method(self, request, context)
                self._measured(name, "OK", started)
                return response
            except QZoomError as e:
                code, details = e.code, e.message
            except Exception as e:  # noqa: BLE001 - the boundary: never crash the server, never leak a trace
                request_id = _request_id(context)
                log.exception("unexpected error in %s (request id %s)", name, request_id)
                code, details = "INTERNAL", f"internal error (request id {request_id})"
                self.health.note_failure(e)
            self._measured(name, code, started)
            if context is not None:
                context.set_code(grpc.StatusCode[code])
                context.set_details(details[:4000])
            return codec.empty_response(name)

        return handler

    return wrap


class QZoomServicer:
    def __init__(self, engine, store, zoom_plan: ZoomPlanFn, answer_box: AnswerBoxFn, *, route: RouteFn | None = None,
                 api_keys: frozenset[str] = frozenset(), max_crops_per_image: int = 64, metrics=None):
        """`store`: the cache holding image bytes and crop handles (`cache.py`). `route`: defaults to
        `engine.route` on one request in a worker thread (a server batches instead). `metrics`: an object
        with `record_result`, `record_cache_stats` and `record_request` (serve/metrics.py), or None."""
        self.engine, self.store, self.config = engine, store, engine.config
        self._zoom_plan, self._answer_box = zoom_plan, answer_box
        self._route = route or (lambda p: asyncio.to_thread(lambda: engine.route([p])[0]))
        self.api_keys, self.max_crops_per_image = api_keys, max_crops_per_image
        self.metrics = metrics or _Unmeasured()
        self.factor = engine.loaded.factor  # pixels per merged token side
        self.health = HealthState()  # what grpc.health.v1 reports; serving from here: the model is loaded

    # -- RPCs ---------------------------------------------------------------------------------------

    @rpc()
    async def UploadImage(self, request, context=None):
        image = load_image(request.image, self.config, self.factor)  # validate before storing anything
        image_id = hashlib.sha256(request.image).hexdigest()
        stored = self.store.put_image(image_id, request.image)
        already = not stored and self.store.get_image(image_id) is not None
        if not stored and not already:
            raise Unavailable("the image store is unavailable; send the image inline with each request")
        return codec.upload_response(image_id, image.size, self._input_size(image.size), already)

    @rpc()
    async def Answer(self, request, context=None):
        data, image_id = self._image_bytes(request)
        options = codec.options_from_proto(request.options)
        prepared = await asyncio.to_thread(self.engine.prepare, Request(data, request.question, options, image_id))
        outcome = await self._route(prepared)
        if isinstance(outcome, ZoomPlan):
            outcome = await self._zoom_plan(for_zoom(prepared), outcome)
        self.metrics.record_result(outcome, options.mode, crops.baseline_tokens(outcome.original_size, self.factor))
        return codec.answer_response(outcome, image_id, self._input_size(outcome.original_size))

    @rpc()
    async def ZoomRegion(self, request, context=None):
        data, image_id = self._image_bytes(request)
        image = load_image(data, self.config, self.factor)
        space = codec.space_name(request.space)
        if not request.HasField("box"):
            raise InvalidInput("box is required")
        size, input_size = image.size, self._input_size(image.size)
        requested = (request.box.x1, request.box.y1, request.box.x2, request.box.y2)
        box = crops.crop_box(self.store, image_id, size, input_size, requested, space, self.factor, request.crop_id)
        crop = image.crop(box)
        crop_id = crops.remember_crop(self.store, image_id, box, self.max_crops_per_image)
        result = None
        if request.question.strip():
            options = codec.options_from_proto(request.options)
            # The decoded image travels, not the bytes: the zoom side never decodes it again.
            result = await self._answer_box(Request(image, request.question, options, image_id), box)
            self.metrics.record_result(result, "explicit", crops.baseline_tokens(size, self.factor))
        return codec.zoom_region_response(crop, box, size, input_size, crop_id, image_id, result)

    @rpc(auth=False)
    async def Health(self, request, context=None):
        return codec.health_response(self.engine.loaded.model_id, __version__, self.store.ping(), self.store.backend,
                                     model_loaded=self.health.serving)

    # -- grpc.health.v1.Health (no auth: Kubernetes probes and grpc_health_probe send no key) -----------

    async def Check(self, request, context=None):
        status = self.health.status(request.service)
        if status is None and context is not None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {request.service!r}; known: {', '.join(map(repr, SERVICES))}")
        return codec.health_check_response(status)

    async def Watch(self, request, context=None):
        """The status now, then each change (gRPC's Watch contract); an unknown service is SERVICE_UNKNOWN."""
        async for status in self.health.changes(request.service):
            yield codec.health_check_response(status)

    # -- helpers ------------------------------------------------------------------------------------

    def _measured(self, method: str, code: str, started: float) -> None:
        self.metrics.record_request(method, code, time.perf_counter() - started)
        self.metrics.record_cache_stats(self.store.stats())

    def _authenticate(self, context) -> None:
        reason = check_api_key(context.invocation_metadata() if context is not None else (), self.api_keys)
        if reason:
            raise Unauthenticated(reason)

    def _image_bytes(self, request) -> tuple[bytes, str]:
        source = request.WhichOneof("source")
        if source == "image_id":
            if not _IMAGE_ID.fullmatch(request.image_id):
                raise InvalidInput(f"image_id {request.image_id[:80]!r} is not an image handle (64 lowercase hex "
                                   "digits, the SHA-256 UploadImage returns)")
            data = self.store.get_image(request.image_id)
            if data is None:
                raise NotFound(f"unknown image_id {request.image_id!r}: upload it first (or it expired)")
            return data, request.image_id
        if source == "image":
            if len(request.image) > self.config.max_image_bytes:
                raise ImageTooLarge(f"image is {len(request.image)} bytes; the limit is {self.config.max_image_bytes}")
            image_id = hashlib.sha256(request.image).hexdigest()
            self.store.put_image(image_id, request.image)  # best effort: makes the id usable later
            return request.image, image_id
        raise InvalidInput("set either image_id or image")

    def _input_size(self, original_size) -> tuple[int, int]:
        return input_size_for(*original_size, self.config.min_pixels, self.config.max_pixels, self.factor)


def answer_box(engine, request: Request | Prepared, box: Box) -> Result:
    """A question about an explicit box (original pixels): the coarse pass, then the zoom on that box."""
    prepared = request if isinstance(request, Prepared) else engine.prepare(request)
    return engine.zoom(prepared, engine.plan_for_box(prepared, box))


def in_process(engine, store, **kwargs) -> QZoomServicer:
    """A servicer whose coarse and zoom passes both run on `engine`, in worker threads of this process."""
    return QZoomServicer(
        engine, store,
        zoom_plan=lambda prepared, plan: asyncio.to_thread(engine.zoom, prepared, plan),
        answer_box=lambda request, box: asyncio.to_thread(answer_box, engine, request, box),
        **kwargs,
    )


def _request_id(context) -> str:
    """The caller's request id where the context carries one (Ray Serve's is a method), else a fresh one."""
    get = getattr(context, "request_id", None)
    return (get() if callable(get) else None) or uuid.uuid4().hex[:16]


class _Unmeasured:
    """Metrics off (tests, a one-process server)."""

    def record_result(self, result, mode: str, baseline_tokens: int) -> None:
        pass

    def record_cache_stats(self, stats: dict) -> None:
        pass

    def record_request(self, method: str, code: str, seconds: float) -> None:
        pass

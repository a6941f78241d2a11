"""`CoarseGate`: the gRPC ingress. Validation, auth, image handles, the coarse pass, the gate and the RPN.

It answers the direct route itself and hands zoom plans to the `Zoom` deployment, so the cheap pass
and the RoI re-decode scale apart. Method names equal the RPC names (Ray Serve dispatches on them).
Errors become gRPC statuses here and only here; the replica keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import logging

import grpc
from PIL import Image
from ray import serve
from ray.serve.exceptions import BackPressureError

from .. import __version__
from ..engine import ZoomPlan
from ..errors import (ImageTooLarge, InvalidInput, LimitExceeded, NotFound, QZoomError, Unauthenticated,
                      Unavailable)
from ..geometry import fit_crop_box, to_original, validate_box
from ..preprocess import input_size_for, load_image
from ..types import Request
from .._proto.qzoom.v1 import qzoom_pb2 as pb
from . import codec
from .auth import check_api_key
from .metrics import ServiceMetrics
from .settings import AppSettings, build_engine

__all__ = ["CoarseGate"]

log = logging.getLogger("ray.serve")


def rpc(response_name: str, auth: bool = True):
    """Turn typed errors into gRPC statuses; anything unexpected is logged and answered INTERNAL.

    `auth=False` only for Health: load balancers and probes call it without credentials.

    The response type is named, not captured: generated message classes cannot be pickled by value, and
    Ray pickles the deployment class (ray-project/ray#47347).
    """

    def wrap(method):
        @functools.wraps(method)
        async def handler(self, request, grpc_context=None):
            try:
                metadata = grpc_context.invocation_metadata() if grpc_context else ()
                reason = check_api_key(metadata, self.api_keys) if auth else None
                if reason:
                    raise Unauthenticated(reason)
                return await method(self, request, grpc_context)
            except Exception as e:  # noqa: BLE001 - the boundary: never crash the replica, never leak a trace
                # A typed error raised in the Zoom deployment arrives wrapped in a RayTaskError.
                typed = e if isinstance(e, QZoomError) else getattr(e, "cause", None)
                if isinstance(typed, QZoomError):
                    code, details = typed.code, typed.message
                elif isinstance(e, BackPressureError):  # the Zoom deployment's queue is full
                    code, details = "RESOURCE_EXHAUSTED", "the zoom pool is at capacity; retry shortly"
                else:
                    request_id = getattr(grpc_context, "request_id", "?")
                    log.exception("unexpected error in %s (request id %s)", method.__name__, request_id)
                    code, details = "INTERNAL", f"internal error (request id {request_id})"
            self.metrics.record_error(method.__name__, code)
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode[code])
                grpc_context.set_details(details[:4000])
            return getattr(pb, response_name)()

        return handler

    return wrap


@serve.deployment(name="CoarseGate", ray_actor_options={"num_cpus": 0.5})
class CoarseGate:
    def __init__(self, zoom_handle, settings: dict):
        self.settings = AppSettings.from_dict(settings)
        self.engine, self.cache = build_engine(self.settings)
        self.config = self.engine.config
        self.api_keys = self.settings.api_keys()
        self.zoom = zoom_handle
        self.metrics = ServiceMetrics()
        self._route_batch.set_max_batch_size(self.settings.engine.max_batch_size)
        self._route_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        log.info("CoarseGate ready: model %s, cache %s, auth %s", self.engine.loaded.model_id,
                 self.cache.backend, "on" if self.api_keys else "off")

    # -- RPCs ---------------------------------------------------------------------------------------

    @rpc("UploadImageResponse")
    async def UploadImage(self, request, grpc_context=None):
        image = load_image(request.image, self.config, self.engine.loaded.factor)  # validate before storing anything
        image_id = hashlib.sha256(request.image).hexdigest()
        stored = self.cache.put_image(image_id, request.image)
        already = not stored and self.cache.get_image(image_id) is not None
        if not stored and not already:
            raise Unavailable("the image store is unavailable; send the image inline with each request")
        width, height = input_size_for(*image.size, self.config.min_pixels, self.config.max_pixels,
                                       self.engine.loaded.factor)
        return pb.UploadImageResponse(image_id=image_id, width=image.width, height=image.height,
                                      input_width=width, input_height=height, already_stored=already)

    @rpc("AnswerResponse")
    async def Answer(self, request, grpc_context=None):
        data, image_id = self._image_bytes(request)
        options = codec.options_from_proto(request.options)
        prepared = await asyncio.to_thread(self.engine.prepare, Request(data, request.question, options, image_id))
        outcome = await self._route_batch(prepared)
        if isinstance(outcome, ZoomPlan):
            outcome = await self.zoom.zoom.remote(data, image_id, request.question, options, outcome)
        self.metrics.record_result(outcome, options.mode, self._baseline_tokens(outcome))
        self.metrics.record_cache_stats(self.cache.stats())
        return codec.answer_response(outcome, image_id, self._input_size(outcome.original_size))

    @rpc("ZoomRegionResponse")
    async def ZoomRegion(self, request, grpc_context=None):
        data, image_id = self._image_bytes(request)
        image = load_image(data, self.config, self.engine.loaded.factor)
        size = image.size
        space = codec.space_name(request.space)
        if not request.HasField("box"):
            raise InvalidInput("box is required")
        box = validate_box((request.box.x1, request.box.y1, request.box.x2, request.box.y2))
        if request.crop_id:
            box = self._box_in_crop(request.crop_id, image_id, box, space)
        else:
            box = to_original(box, space, size, self._input_size(size))
        # Snap float noise first: 500 of 1000 on 480 px maps to 239.99999999999997, which fit_crop_box's
        # truncation would turn into 239 (a crop one pixel taller than asked for).
        box = fit_crop_box(tuple(round(v, 6) for v in box), size, min_side=self.engine.loaded.factor)
        crop = image.crop(box)
        crop_id = self._remember_crop(image_id, box)
        response = pb.ZoomRegionResponse(
            crop_png=_png(crop), box=codec.box_set(box, size, self._input_size(size)), crop_id=crop_id,
            crop_width=crop.width, crop_height=crop.height, image_id=image_id,
        )
        if request.question.strip():
            options = codec.options_from_proto(request.options)
            result = await self.zoom.answer_box.remote(data, image_id, request.question, options, box)
            response.answer = result.answer
            response.visual_tokens.CopyFrom(pb.VisualTokens(**result.visual_tokens))
            response.timings_ms.update(result.timings_ms)
            response.cache_hit = result.cache_hit
            response.generated_ids.extend(result.generated_ids)
            self.metrics.record_result(result, "explicit", self._baseline_tokens(result))
        return response

    @rpc("HealthResponse", auth=False)
    async def Health(self, request, grpc_context=None):
        return pb.HealthResponse(model_loaded=True, cache_reachable=self.cache.ping(),
                                 model_id=self.engine.loaded.model_id, version=__version__,
                                 cache_backend=self.cache.backend)

    # -- helpers ------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _route_batch(self, prepared: list):
        """Dynamic batching of the coarse pass: one vision-tower call for the batch's cache misses."""
        return await asyncio.to_thread(self.engine.route, prepared)

    def _image_bytes(self, request) -> tuple[bytes, str]:
        source = request.WhichOneof("source")
        if source == "image_id":
            data = self.cache.get_image(request.image_id)
            if data is None:
                raise NotFound(f"unknown image_id {request.image_id!r}: upload it first (or it expired)")
            return data, request.image_id
        if source == "image":
            if len(request.image) > self.config.max_image_bytes:
                raise ImageTooLarge(f"image is {len(request.image)} bytes; the limit is {self.config.max_image_bytes}")
            image_id = hashlib.sha256(request.image).hexdigest()
            self.cache.put_image(image_id, request.image)  # best effort: makes the id usable later
            return request.image, image_id
        raise InvalidInput("set either image_id or image")

    def _input_size(self, original_size) -> tuple[int, int]:
        return input_size_for(*original_size, self.config.min_pixels, self.config.max_pixels,
                              self.engine.loaded.factor)

    def _baseline_tokens(self, result) -> int:
        """Merged tokens of the original image at full resolution (capped at 16384, the model's limit)."""
        f = self.engine.loaded.factor
        w, h = input_size_for(*result.original_size, 4 * f * f, 16384 * f * f, f)
        return (w // f) * (h // f)

    def _remember_crop(self, image_id: str, box) -> str:
        """Store the crop's handle; refuse a new crop past `max_crops_per_image` for this image.

        The count lives in the cache next to the handles (read-modify-write: concurrent calls may overshoot
        by a few; with the in-process cache it is per replica).
        """
        crop_id = "crop-" + hashlib.sha256(f"{image_id}:{list(box)}".encode()).hexdigest()[:24]
        if self.cache.get_blob(crop_id) is not None:
            return crop_id
        count_key = f"crop-count-{image_id}"
        count = int(self.cache.get_blob(count_key) or b"0")
        limit = self.settings.max_crops_per_image
        if count >= limit:
            raise LimitExceeded(f"this image already has {count} crops (the limit is {limit}); zoom into an "
                                "existing crop_id or answer from what you have")
        self.cache.put_blob(crop_id, json.dumps({"image_id": image_id, "box": list(box)}).encode())
        self.cache.put_blob(count_key, str(count + 1).encode())
        return crop_id

    def _box_in_crop(self, crop_id: str, image_id: str, box, space: str):
        """A box relative to an earlier crop -> original pixels (spaces relative to the crop's size)."""
        raw = self.cache.get_blob(crop_id)
        if raw is None:
            raise NotFound(f"unknown crop_id {crop_id!r}")
        record = json.loads(raw)
        if record["image_id"] != image_id:
            raise InvalidInput(f"crop {crop_id} belongs to another image")
        cx1, cy1, cx2, cy2 = record["box"]
        if space == "input":
            raise InvalidInput("COORD_SPACE_INPUT is not defined for crops; use original, norm1000 or norm1")
        x1, y1, x2, y2 = to_original(box, space, (cx2 - cx1, cy2 - cy1))
        return x1 + cx1, y1 + cy1, min(x2 + cx1, cx2), min(y2 + cy1, cy2)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

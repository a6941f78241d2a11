"""Sync and async gRPC clients for qzoom-service (package `qzoom.v1`).

Images are given as bytes (sent inline), a path to a file (read and sent inline) or an image id (a
64-character sha256 hex string returned by `upload_image`). Calls that fail with UNAVAILABLE are retried
by gRPC itself, from the channel's service config (`retryPolicy`: exponential backoff with gRPC's own
jitter); every other status raises `QZoomClientError` at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._proto.qzoom.v1 import qzoom_pb2 as pb
from ._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

__all__ = ["QZoomClient", "AsyncQZoomClient", "QZoomClientError", "AnswerResult", "ZoomResult", "UploadResult",
           "HealthResult", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "channel_options"]

_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
_MODES = {"auto": pb.MODE_AUTO, "direct": pb.MODE_DIRECT, "zoom": pb.MODE_ZOOM}
_SPACES = {"original": pb.COORD_SPACE_ORIGINAL, "input": pb.COORD_SPACE_INPUT,
           "norm1000": pb.COORD_SPACE_NORM1000, "norm1": pb.COORD_SPACE_NORM1}
_SERVICE = "qzoom.v1.QZoomService"

# The server's default limits (EngineConfig.max_image_bytes / max_image_pixels): the largest image it
# accepts, inline, and the most pixels it decodes.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 64_000_000
_ENVELOPE = 1 << 20  # question, options and the other fields around an image or a crop
# A crop is a PNG of up to the whole decoded image: 8-bit RGB(A) is at most 4 bytes a pixel plus PNG's
# per-row filter byte and deflate's block headers, well inside this bound.
_MAX_CROP_BYTES = 5 * MAX_IMAGE_PIXELS
_MAX_ATTEMPTS = 5  # gRPC caps a retry policy's maxAttempts at 5


def channel_options(retries: int = 3, backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                    max_send_bytes: int = MAX_IMAGE_BYTES + _ENVELOPE,
                    max_receive_bytes: int = _MAX_CROP_BYTES + _ENVELOPE) -> list[tuple[str, object]]:
    """gRPC channel options: message limits that fit the largest image the server accepts and a crop of
    all of it (gRPC's default receive limit is 4 MiB), and UNAVAILABLE retried `retries` times (at most 4)
    through the service config."""
    options = [("grpc.max_send_message_length", max_send_bytes),
               ("grpc.max_receive_message_length", max_receive_bytes)]
    if retries > 0:
        policy = {"maxAttempts": min(retries + 1, _MAX_ATTEMPTS), "initialBackoff": f"{backoff_s}s",
                  "maxBackoff": f"{max(max_backoff_s, backoff_s)}s", "backoffMultiplier": 2,
                  "retryableStatusCodes": ["UNAVAILABLE"]}
        config = {"methodConfig": [{"name": [{"service": _SERVICE}, {"service": "grpc.health.v1.Health"}],
                                    "retryPolicy": policy}]}
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]
    return options


class QZoomClientError(Exception):
    """A call failed; `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `details` the server's text."""

    def __init__(self, code: str, details: str):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


@dataclass(frozen=True)
class UploadResult:
    image_id: str
    width: int
    height: int
    input_width: int
    input_height: int
    already_stored: bool

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AnswerResult:
    answer: str
    route: str
    gate_score: float | None
    roi_box: list[float] | None  # original pixels
    roi_box_norm1000: list[float] | None
    roi_map: list[list[float]] | None
    roi_source: str | None
    visual_tokens: dict
    generated_ids: list[int]
    timings_ms: dict
    image_id: str
    cache_hit: bool

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ZoomResult:
    crop_png: bytes
    crop_id: str
    box: dict  # {space: [x1, y1, x2, y2]} for original, input, norm1000 and norm1
    crop_width: int
    crop_height: int
    answer: str | None
    visual_tokens: dict
    generated_ids: list[int]
    timings_ms: dict
    image_id: str
    cache_hit: bool

    def to_json(self) -> dict:
        out = asdict(self)
        del out["crop_png"]  # binary: written to a file by the CLI, not printed
        return out


@dataclass(frozen=True)
class HealthResult:
    model_loaded: bool
    cache_reachable: bool
    model_id: str
    version: str
    cache_backend: str

    def to_json(self) -> dict:
        return asdict(self)


# -- requests and responses ------------------------------------------------------------------------

def _source(image_or_id) -> dict:
    if isinstance(image_or_id, (bytes, bytearray, memoryview)):
        return {"image": bytes(image_or_id)}
    if isinstance(image_or_id, str) and _IMAGE_ID.match(image_or_id):
        return {"image_id": image_or_id}
    path = Path(image_or_id)
    if not path.is_file():
        raise QZoomClientError("INVALID_ARGUMENT", f"{image_or_id!r} is neither an image file nor an image id")
    return {"image": path.read_bytes()}


def _upload(image) -> "pb.UploadImageRequest":
    source = _source(image)
    if "image" not in source:
        raise QZoomClientError("INVALID_ARGUMENT", "upload_image needs image bytes or a file path, not an image id")
    return pb.UploadImageRequest(image=source["image"])


def _options(mode="auto", prompt_suffix="", **values) -> "pb.AnswerOptions":
    if mode not in _MODES:
        raise QZoomClientError("INVALID_ARGUMENT", f"mode must be one of {', '.join(_MODES)}; got {mode!r}")
    return pb.AnswerOptions(mode=_MODES[mode], prompt_suffix=prompt_suffix,
                            **{k: v for k, v in values.items() if v is not None})


def _box(b) -> list[float]:
    return [b.x1, b.y1, b.x2, b.y2]


def _answer_result(r) -> AnswerResult:
    zoomed = r.HasField("roi_box")
    rows, cols = r.roi_map.rows, r.roi_map.cols
    return AnswerResult(
        answer=r.answer,
        route={pb.ROUTE_DIRECT: "direct", pb.ROUTE_ZOOM: "zoom"}.get(r.route, "unspecified"),
        gate_score=r.gate_score if r.HasField("gate_score") else None,
        roi_box=_box(r.roi_box.original) if zoomed else None,
        roi_box_norm1000=_box(r.roi_box.norm1000) if zoomed else None,
        roi_map=[list(r.roi_map.values[i * cols:(i + 1) * cols]) for i in range(rows)] if rows else None,
        roi_source=r.roi_source or None,
        visual_tokens={"coarse": r.visual_tokens.coarse, "zoom": r.visual_tokens.zoom},
        generated_ids=list(r.generated_ids),
        timings_ms=dict(r.timings_ms),
        image_id=r.image_id,
        cache_hit=r.cache_hit,
    )


def _zoom_result(r) -> ZoomResult:
    return ZoomResult(
        crop_png=r.crop_png, crop_id=r.crop_id,
        box={space: _box(getattr(r.box, space)) for space in _SPACES},
        crop_width=r.crop_width, crop_height=r.crop_height,
        answer=r.answer if r.HasField("answer") else None,
        visual_tokens={"coarse": r.visual_tokens.coarse, "zoom": r.visual_tokens.zoom},
        generated_ids=list(r.generated_ids), timings_ms=dict(r.timings_ms), image_id=r.image_id,
        cache_hit=r.cache_hit,
    )


def _zoom_request(image_or_id, box, space, question, crop_id, label, options) -> "pb.ZoomRegionRequest":
    if space not in _SPACES:
        raise QZoomClientError("INVALID_ARGUMENT", f"space must be one of {', '.join(_SPACES)}; got {space!r}")
    if len(box) != 4:
        raise QZoomClientError("INVALID_ARGUMENT", f"a box has 4 numbers (x1, y1, x2, y2); got {len(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    return pb.ZoomRegionRequest(box=pb.Box(x1=x1, y1=y1, x2=x2, y2=y2), space=_SPACES[space],
                                question=question or "", crop_id=crop_id or "", label=label,
                                options=_options(**options), **_source(image_or_id))


class _Base:
    """`retries`: extra attempts after UNAVAILABLE (0 to 4), `backoff_s` the first wait; `**channel`: further
    `channel_options` (e.g. `max_receive_bytes`)."""

    def __init__(self, addr: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.2, application: str | None = None, **channel):
        self.addr, self.timeout = addr, timeout
        self.options = channel_options(retries=retries, backoff_s=backoff_s, **channel)
        self.metadata = tuple(
            ([("authorization", f"Bearer {api_key}")] if api_key else [])
            + ([("application", application)] if application else [])
        )


def _health_result(r) -> HealthResult:
    return HealthResult(r.model_loaded, r.cache_reachable, r.model_id, r.version, r.cache_backend)


def _status_name(r) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


class QZoomClient(_Base):
    """Blocking client. Use as a context manager or call `close()`."""

    def __init__(self, addr: str, **kwargs):
        super().__init__(addr, **kwargs)
        self._channel = grpc.insecure_channel(addr, options=self.options)
        self._stub = pb_grpc.QZoomServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, stub, method: str, request):
        try:
            return getattr(stub, method)(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise QZoomClientError(e.code().name, e.details() or "") from None

    def upload_image(self, image) -> UploadResult:
        r = self._call(self._stub, "UploadImage", _upload(image))
        return UploadResult(r.image_id, r.width, r.height, r.input_width, r.input_height, r.already_stored)

    def answer(self, image_or_id, question: str, **options) -> AnswerResult:
        request = pb.AnswerRequest(question=question, options=_options(**options), **_source(image_or_id))
        return _answer_result(self._call(self._stub, "Answer", request))

    def zoom_region(self, image_or_id, box, space: str = "original", *, question: str | None = None,
                    crop_id: str | None = None, label: str = "", **options) -> ZoomResult:
        request = _zoom_request(image_or_id, box, space, question, crop_id, label, options)
        return _zoom_result(self._call(self._stub, "ZoomRegion", request))

    def health(self) -> HealthResult:
        """The detailed status (`qzoom.v1` Health): model, cache, version."""
        return _health_result(self._call(self._stub, "Health", pb.HealthRequest()))

    def check(self, service: str = _SERVICE) -> str:
        """The standard `grpc.health.v1` status a probe sees: "SERVING" or "NOT_SERVING"."""
        return _status_name(self._call(self._health, "Check", health_pb2.HealthCheckRequest(service=service)))


class AsyncQZoomClient(_Base):
    """asyncio client (`grpc.aio`) with the same methods as `QZoomClient`, as coroutines."""

    def __init__(self, addr: str, **kwargs):
        super().__init__(addr, **kwargs)
        self._channel = grpc.aio.insecure_channel(addr, options=self.options)
        self._stub = pb_grpc.QZoomServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, stub, method: str, request):
        try:
            return await getattr(stub, method)(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise QZoomClientError(e.code().name, e.details() or "") from None

    async def upload_image(self, image) -> UploadResult:
        r = await self._call(self._stub, "UploadImage", _upload(image))
        return UploadResult(r.image_id, r.width, r.height, r.input_width, r.input_height, r.already_stored)

    async def answer(self, image_or_id, question: str, **options) -> AnswerResult:
        request = pb.AnswerRequest(question=question, options=_options(**options), **_source(image_or_id))
        return _answer_result(await self._call(self._stub, "Answer", request))

    async def zoom_region(self, image_or_id, box, space: str = "original", *, question: str | None = None,
                          crop_id: str | None = None, label: str = "", **options) -> ZoomResult:
        request = _zoom_request(image_or_id, box, space, question, crop_id, label, options)
        return _zoom_result(await self._call(self._stub, "ZoomRegion", request))

    async def health(self) -> HealthResult:
        return _health_result(await self._call(self._stub, "Health", pb.HealthRequest()))

    async def check(self, service: str = _SERVICE) -> str:
        return _status_name(await self._call(self._health, "Check", health_pb2.HealthCheckRequest(service=service)))

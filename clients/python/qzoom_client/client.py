"""Sync and async gRPC clients for qzoom-service (package `qzoom.v1`).

Images are given as bytes (sent inline), a path to a file (read and sent inline) or an image id (a
64-character sha256 hex string returned by `upload_image`). Calls that fail with UNAVAILABLE are retried
with exponential backoff; every other status raises `QZoomClientError` at once.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from ._proto.qzoom.v1 import qzoom_pb2 as pb
from ._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

__all__ = ["QZoomClient", "AsyncQZoomClient", "QZoomClientError", "AnswerResult", "ZoomResult", "UploadResult",
           "HealthResult"]

_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
_MODES = {"auto": pb.MODE_AUTO, "direct": pb.MODE_DIRECT, "zoom": pb.MODE_ZOOM}
_SPACES = {"original": pb.COORD_SPACE_ORIGINAL, "input": pb.COORD_SPACE_INPUT,
           "norm1000": pb.COORD_SPACE_NORM1000, "norm1": pb.COORD_SPACE_NORM1}
_RETRIED = (grpc.StatusCode.UNAVAILABLE,)


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
    def __init__(self, addr: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.2, application: str | None = None):
        self.addr, self.timeout, self.retries, self.backoff_s = addr, timeout, retries, backoff_s
        self.metadata = tuple(
            ([("authorization", f"Bearer {api_key}")] if api_key else [])
            + ([("application", application)] if application else [])
        )

    def _delay(self, attempt: int) -> float:
        return self.backoff_s * (2 ** attempt)


class QZoomClient(_Base):
    """Blocking client. Use as a context manager or call `close()`."""

    def __init__(self, addr: str, **kwargs):
        super().__init__(addr, **kwargs)
        self._channel = grpc.insecure_channel(addr)
        self._stub = pb_grpc.QZoomServiceStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request):
        for attempt in range(self.retries + 1):
            try:
                return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() not in _RETRIED or attempt == self.retries:
                    raise QZoomClientError(e.code().name, e.details() or "") from None
                time.sleep(self._delay(attempt))

    def upload_image(self, image) -> UploadResult:
        r = self._call("UploadImage", _upload(image))
        return UploadResult(r.image_id, r.width, r.height, r.input_width, r.input_height, r.already_stored)

    def answer(self, image_or_id, question: str, **options) -> AnswerResult:
        request = pb.AnswerRequest(question=question, options=_options(**options), **_source(image_or_id))
        return _answer_result(self._call("Answer", request))

    def zoom_region(self, image_or_id, box, space: str = "original", *, question: str | None = None,
                    crop_id: str | None = None, label: str = "", **options) -> ZoomResult:
        request = _zoom_request(image_or_id, box, space, question, crop_id, label, options)
        return _zoom_result(self._call("ZoomRegion", request))

    def health(self) -> HealthResult:
        r = self._call("Health", pb.HealthRequest())
        return HealthResult(r.model_loaded, r.cache_reachable, r.model_id, r.version, r.cache_backend)


class AsyncQZoomClient(_Base):
    """asyncio client (`grpc.aio`) with the same methods as `QZoomClient`, as coroutines."""

    def __init__(self, addr: str, **kwargs):
        super().__init__(addr, **kwargs)
        self._channel = grpc.aio.insecure_channel(addr)
        self._stub = pb_grpc.QZoomServiceStub(self._channel)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request):
        for attempt in range(self.retries + 1):
            try:
                return await getattr(self._stub, method)(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RETRIED or attempt == self.retries:
                    raise QZoomClientError(e.code().name, e.details() or "") from None
                await asyncio.sleep(self._delay(attempt))

    async def upload_image(self, image) -> UploadResult:
        r = await self._call("UploadImage", _upload(image))
        return UploadResult(r.image_id, r.width, r.height, r.input_width, r.input_height, r.already_stored)

    async def answer(self, image_or_id, question: str, **options) -> AnswerResult:
        request = pb.AnswerRequest(question=question, options=_options(**options), **_source(image_or_id))
        return _answer_result(await self._call("Answer", request))

    async def zoom_region(self, image_or_id, box, space: str = "original", *, question: str | None = None,
                          crop_id: str | None = None, label: str = "", **options) -> ZoomResult:
        request = _zoom_request(image_or_id, box, space, question, crop_id, label, options)
        return _zoom_result(await self._call("ZoomRegion", request))

    async def health(self) -> HealthResult:
        r = await self._call("Health", pb.HealthRequest())
        return HealthResult(r.model_loaded, r.cache_reachable, r.model_id, r.version, r.cache_backend)

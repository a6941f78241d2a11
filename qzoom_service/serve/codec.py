"""Protobuf <-> engine types: request options in, every RPC's response out. The one place that builds
response messages; the servicer decides what goes into them."""

from __future__ import annotations

import io

from grpc_health.v1 import health_pb2
from PIL import Image
from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client.coords import all_spaces

from ..config import RequestOptions
from ..errors import InvalidInput
from ..types import Result

__all__ = ["options_from_proto", "answer_response", "upload_response", "zoom_region_response", "health_response",
           "health_check_response", "empty_response", "box_set", "space_name", "route_enum"]

_MODES = {pb.MODE_UNSPECIFIED: "auto", pb.MODE_AUTO: "auto", pb.MODE_DIRECT: "direct", pb.MODE_ZOOM: "zoom"}
_SPACES = {
    pb.COORD_SPACE_ORIGINAL: "original",
    pb.COORD_SPACE_INPUT: "input",
    pb.COORD_SPACE_NORM1000: "norm1000",
    pb.COORD_SPACE_NORM1: "norm1",
}


def options_from_proto(options) -> RequestOptions:
    if options.mode not in _MODES:
        raise InvalidInput(f"unknown mode {options.mode}; use MODE_AUTO, MODE_DIRECT or MODE_ZOOM")

    def opt(name):
        return getattr(options, name) if options.HasField(name) else None

    return RequestOptions(
        mode=_MODES[options.mode],
        gate_threshold=opt("gate_threshold"),
        roi_threshold=opt("roi_threshold"),
        min_pixels=opt("min_pixels"),
        max_pixels=opt("max_pixels"),
        zoom_min_pixels=opt("zoom_min_pixels"),
        zoom_max_pixels=opt("zoom_max_pixels"),
        max_new_tokens=opt("max_new_tokens"),
        prompt_suffix=options.prompt_suffix,
    ).validate()


def space_name(space: int) -> str:
    if space not in _SPACES:
        raise InvalidInput(
            f"coordinate space {space} is not supported; use one of COORD_SPACE_ORIGINAL, COORD_SPACE_INPUT, "
            "COORD_SPACE_NORM1000, COORD_SPACE_NORM1"
        )
    return _SPACES[space]


def box_set(box, original_size, input_size) -> "pb.BoxSet":
    spaces = all_spaces(box, original_size, input_size)
    return pb.BoxSet(**{s: pb.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for s, b in spaces.items()})


def route_enum(route: str) -> int:
    return pb.ROUTE_ZOOM if route == "zoom" else pb.ROUTE_DIRECT


def answer_response(result: Result, image_id: str, default_input_size) -> "pb.AnswerResponse":
    """`default_input_size`: model-input size at the server's default budget (the `input` box space)."""
    response = pb.AnswerResponse(
        answer=result.answer,
        route=route_enum(result.route),
        visual_tokens=pb.VisualTokens(**result.visual_tokens),
        timings_ms=result.timings_ms,
        cache_hit=result.cache_hit,
        image_id=image_id,
        generated_ids=result.generated_ids,
        roi_source=result.roi_source or "",
    )
    if result.gate_score is not None:
        response.gate_score = result.gate_score
    if result.roi_box is not None:
        response.roi_box.CopyFrom(box_set(result.roi_box, result.original_size, default_input_size))
    if result.roi_map is not None:
        rows = result.roi_map
        response.roi_map.CopyFrom(pb.RoiMap(rows=len(rows), cols=len(rows[0]), values=[v for r in rows for v in r]))
    return response


def upload_response(image_id: str, original_size, input_size, already_stored: bool) -> "pb.UploadImageResponse":
    """`input_size`: model-input size at the server's default budget."""
    return pb.UploadImageResponse(image_id=image_id, width=original_size[0], height=original_size[1],
                                  input_width=input_size[0], input_height=input_size[1],
                                  already_stored=already_stored)


def zoom_region_response(crop: Image.Image, box, original_size, input_size, crop_id: str, image_id: str,
                         result: Result | None = None) -> "pb.ZoomRegionResponse":
    """The crop as PNG and the box in every space; with `result` (a question was asked) its answer too."""
    response = pb.ZoomRegionResponse(
        crop_png=_png(crop), box=box_set(box, original_size, input_size), crop_id=crop_id,
        crop_width=crop.width, crop_height=crop.height, image_id=image_id,
    )
    if result is not None:
        response.answer = result.answer
        response.visual_tokens.CopyFrom(pb.VisualTokens(**result.visual_tokens))
        response.timings_ms.update(result.timings_ms)
        response.cache_hit = result.cache_hit
        response.generated_ids.extend(result.generated_ids)
    return response


def health_response(model_id: str, version: str, cache_reachable: bool, cache_backend: str,
                    model_loaded: bool = True) -> "pb.HealthResponse":
    return pb.HealthResponse(model_loaded=model_loaded, cache_reachable=cache_reachable, model_id=model_id,
                             version=version, cache_backend=cache_backend)


def health_check_response(status: int | None) -> "health_pb2.HealthCheckResponse":
    """`status`: a `ServingStatus`; None (an unknown service, answered NOT_FOUND) sends the default."""
    return health_pb2.HealthCheckResponse(status=status or health_pb2.HealthCheckResponse.UNKNOWN)


def empty_response(method: str):
    """The response message of an RPC that failed (gRPC sends only the status; Ray Serve needs a message)."""
    return getattr(pb, f"{method}Response")()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()

"""The gRPC servicer without Ray: auth, status codes, image and crop handles, what it hands to the zoom side,
and the error boundary. Real protobuf messages in and out; the in-process cache as the store."""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import threading
import zlib

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from PIL import Image
from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb

from qzoom_service.cache import InProcessCache
from qzoom_service.config import EngineConfig
from qzoom_service.engine import QZoomEngine
from qzoom_service.errors import LimitExceeded, Overloaded
from qzoom_service.serve import servicer as servicer_module
from qzoom_service.serve.servicer import QZoomServicer, in_process

from ..helpers import TINY_BUDGET, make_image, png

KEYS = frozenset({"key-one", "key-two"})



IMAGE = png(make_image(640, 480, seed=21))


def _bomb() -> bytes:
    data = bytearray(png(Image.new("RGB", (8, 8))))
    data[16:24] = struct.pack(">II", 5000, 5000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


class Context:
    """What a gRPC servicer context offers the servicer: metadata in, a status out."""

    def __init__(self, key: str | None = None, request_id: str | None = None):
        self.metadata = [("authorization", f"Bearer {key}")] if key else []
        self.code, self.details = grpc.StatusCode.OK, ""
        if request_id:
            self.request_id = lambda: request_id  # Ray Serve's context has a request_id() method

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


class Metrics:
    def __init__(self):
        self.results, self.errors, self.requests, self.cache_stats = [], [], [], []

    def record_result(self, result, mode, baseline_tokens):
        self.results.append((result.route, mode, baseline_tokens))

    def record_cache_stats(self, stats):
        self.cache_stats.append(stats)

    def record_request(self, method, code, seconds):
        self.requests.append((method, code, seconds))
        if code != "OK":
            self.errors.append((method, code))


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    config = EngineConfig(max_new_tokens=4, max_image_bytes=3_000_000, max_image_pixels=20_000_000, **TINY_BUDGET)
    return QZoomEngine(tiny_loaded, config, feature_cache=InProcessCache())


@pytest.fixture
def store():
    return InProcessCache()


@pytest.fixture
def metrics():
    return Metrics()


@pytest.fixture
def service(engine, store, metrics):
    return in_process(engine, store, max_crops_per_image=4, metrics=metrics)


def call(service, method, request, **context):
    """-> (response, context) of one RPC, as a gRPC server would run it."""
    ctx = Context(**context)
    return asyncio.run(getattr(service, method)(request, ctx)), ctx


def status(service, method, request, **context) -> tuple[grpc.StatusCode, str]:
    _, ctx = call(service, method, request, **context)
    return ctx.code, ctx.details


def _answer(image=IMAGE, image_id=None, question="What colour is the box?", **options):
    source = {"image_id": image_id} if image_id else {"image": image}
    return pb.AnswerRequest(question=question, options=pb.AnswerOptions(**options), **source)


def _zoom(image_id, box=(0, 0, 100, 100), space=pb.COORD_SPACE_ORIGINAL, **kw):
    return pb.ZoomRegionRequest(image_id=image_id, box=pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]),
                                space=space, **kw)


def _upload(service, image=IMAGE) -> str:
    response, ctx = call(service, "UploadImage", pb.UploadImageRequest(image=image))
    assert ctx.code == grpc.StatusCode.OK, ctx.details
    return response.image_id


# -- auth ---------------------------------------------------------------------------------------------


def test_api_keys_are_checked_on_every_rpc_but_health(engine, store):
    secured = in_process(engine, store, api_keys=KEYS)
    request = _answer(mode=pb.MODE_DIRECT)
    assert status(secured, "Answer", request)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "missing authorization" in status(secured, "UploadImage", pb.UploadImageRequest(image=IMAGE))[1]
    assert status(secured, "ZoomRegion", _zoom("0" * 64), key="wrong") == (grpc.StatusCode.UNAUTHENTICATED,
                                                                            "invalid API key")
    response, ctx = call(secured, "Answer", request, key="key-two")
    assert ctx.code == grpc.StatusCode.OK and response.route == pb.ROUTE_DIRECT
    assert call(secured, "Health", pb.HealthRequest())[0].model_loaded  # probes send no key
    assert status(in_process(engine, store), "Answer", request)[0] == grpc.StatusCode.OK  # no keys: auth off


# -- status codes of bad input --------------------------------------------------------------------------


def test_bad_answers_get_their_status_code(service):
    cases = [
        (_answer(image=b"\x89PNG garbage"), grpc.StatusCode.INVALID_ARGUMENT, "not a readable image"),
        (_answer(image=IMAGE[: len(IMAGE) // 3]), grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        (_answer(image=b"\0" * 3_100_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit is 3000000"),
        (_answer(image=_bomb()), grpc.StatusCode.RESOURCE_EXHAUSTED, "25000000 pixels"),
        (_answer(image_id="0" * 64), grpc.StatusCode.NOT_FOUND, "unknown image_id"),
        (pb.AnswerRequest(question="q?"), grpc.StatusCode.INVALID_ARGUMENT, "set either image_id or image"),
        (_answer(question="  "), grpc.StatusCode.INVALID_ARGUMENT, "question is empty"),
        (_answer(gate_threshold=2.0), grpc.StatusCode.INVALID_ARGUMENT, "gate_threshold"),
        (_answer(mode=42), grpc.StatusCode.INVALID_ARGUMENT, "unknown mode"),
        # The image processor's aspect-ratio limit (it raised a bare ValueError: INTERNAL).
        (_answer(image=png(Image.new("RGB", (8000, 30)))), grpc.StatusCode.INVALID_ARGUMENT, "aspect ratio of 286"),
    ]
    for request, code, text in cases:
        got, details = status(service, "Answer", request)
        assert (got, text in details) == (code, True), (text, got, details)


def test_bad_uploads_store_nothing(service, store):
    assert status(service, "UploadImage", pb.UploadImageRequest(image=_bomb()))[0] == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status(service, "UploadImage", pb.UploadImageRequest(image=b"nope"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert store.stats()["entries"] == 0


def test_upload_answers_unavailable_when_the_store_cannot_hold_the_image(engine):
    service = in_process(engine, InProcessCache(max_bytes=1000))  # the image is larger than the whole store
    code, details = status(service, "UploadImage", pb.UploadImageRequest(image=IMAGE))
    assert code == grpc.StatusCode.UNAVAILABLE and "image store" in details


def test_bad_zoom_regions_get_their_status_code(service):
    kept = _upload(service)
    other = _upload(service, png(make_image(300, 300, seed=3)))
    crop_id = call(service, "ZoomRegion", _zoom(kept, (0, 0, 320, 240)))[0].crop_id
    cases = [
        (pb.ZoomRegionRequest(image_id=kept, space=pb.COORD_SPACE_ORIGINAL), "box is required"),
        (_zoom(kept, (300, 10, 100, 90)), "inverted"),
        (_zoom(kept, (10, 10, 10, 90)), "empty"),
        (_zoom(kept, (float("nan"), 0, 5, 5)), "finite"),
        (_zoom(kept, (700, 500, 900, 600)), "outside"),
        (_zoom(kept, space=pb.COORD_SPACE_UNSPECIFIED), "coordinate space"),
        (_zoom(kept, space=42), "coordinate space"),
        (pb.ZoomRegionRequest(box=pb.Box(x1=0, y1=0, x2=9, y2=9), space=pb.COORD_SPACE_ORIGINAL), "set either"),
        (_zoom(other, (0, 0, 1, 1), pb.COORD_SPACE_NORM1, crop_id=crop_id), "belongs to another image"),
        (_zoom(kept, (0, 0, 10, 10), pb.COORD_SPACE_INPUT, crop_id=crop_id), "COORD_SPACE_INPUT is not defined"),
        (_zoom(kept, question="why? " * 1000, options=pb.AnswerOptions()), "question has 5000 characters"),
    ]
    for request, text in cases:
        got, details = status(service, "ZoomRegion", request)
        assert (got, text in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), (text, got, details)
    code, details = status(service, "ZoomRegion", _zoom("f" * 64))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown image_id" in details
    code, details = status(service, "ZoomRegion", _zoom(kept, (0, 0, 1, 1), pb.COORD_SPACE_NORM1,
                                                        crop_id="crop-" + "0" * 24))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown crop_id" in details


# -- the cost model and caller mistakes found by the audit (each was INTERNAL or ran for minutes before) -------


@pytest.fixture
def limited(tiny_loaded, store):
    """A servicer with small prompt and visual-token limits; the vision tower counts its calls."""
    config = EngineConfig(max_new_tokens=4, max_prompt_tokens=40, max_visual_tokens=200, **TINY_BUDGET)
    return in_process(QZoomEngine(tiny_loaded, config, feature_cache=InProcessCache()), store)


def test_prompts_over_the_token_limit_are_refused_naming_the_limit(limited):
    cases = [
        _answer(question="q?", prompt_suffix="a" * 60, mode=pb.MODE_DIRECT),  # the suffix counts too
        _answer(question="q" * 41),
        _answer(question="\U0001F642" * 30),  # 30 characters, 120 bytes: more tokens than characters
        _answer(question="q?", prompt_suffix="a" * 16_000),  # refused before it is tokenized
    ]
    for request in cases:
        code, details = status(limited, "Answer", request)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_prompt_tokens is 40" in details, details
    code, details = status(limited, "Answer", _answer(question="q?", prompt_suffix=" ok", mode=pb.MODE_DIRECT))
    assert code == grpc.StatusCode.OK, details


def test_budgets_over_the_visual_token_cap_are_refused_naming_the_cap(limited, tiny_loaded):
    f2 = tiny_loaded.factor ** 2
    for options in (dict(max_pixels=201 * f2), dict(zoom_max_pixels=16384 * f2)):
        code, details = status(limited, "Answer", _answer(**options))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_visual_tokens is 200" in details, (options, details)
    code, details = status(limited, "Answer", _answer(max_pixels=200 * f2, mode=pb.MODE_DIRECT))
    assert code == grpc.StatusCode.OK, details


def test_malformed_handles_are_invalid_argument_before_any_lookup(service):
    kept = _upload(service)
    for image_id in ("0" * 63, "F" * 64, "blob:crop-" + "0" * 24, "../" + "0" * 61):
        for method, request in (("Answer", _answer(image_id=image_id)), ("ZoomRegion", _zoom(image_id))):
            code, details = status(service, method, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not an image handle" in details, (method, details)
    for crop_id in ("crop-x", "crop-count-" + kept, kept, "crop-" + "g" * 24):
        code, details = status(service, "ZoomRegion", _zoom(kept, (0, 0, 1, 1), pb.COORD_SPACE_NORM1, crop_id=crop_id))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a crop handle" in details, details


def test_boxes_that_overflow_once_converted_are_invalid_argument(service):
    kept = _upload(service)
    crop_id = call(service, "ZoomRegion", _zoom(kept, (0, 0, 320, 240)))[0].crop_id
    for request in (_zoom(kept, (0, 0, 1e308, 1), pb.COORD_SPACE_NORM1),
                    _zoom(kept, (1e307, 0, 1e308, 1), pb.COORD_SPACE_NORM1, crop_id=crop_id),
                    _zoom(kept, (0, 0, 1.7e308, 10), pb.COORD_SPACE_INPUT)):
        code, details = status(service, "ZoomRegion", request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "once converted to original pixels" in details, details


# -- crops ----------------------------------------------------------------------------------------------


def test_zoom_regions_in_every_space_and_crops_of_crops(service):
    image_id = _upload(service)
    clamped = call(service, "ZoomRegion", _zoom(image_id, (500, 400, 800, 700)))[0]
    assert (clamped.box.original.x1, clamped.box.original.y2, clamped.crop_width) == (500, 480, 140)
    half = call(service, "ZoomRegion", _zoom(image_id, (0.5, 0.5, 1, 1), pb.COORD_SPACE_NORM1))[0]
    assert (half.box.original.x1, half.box.original.y1, half.crop_width, half.crop_height) == (320, 240, 320, 240)
    assert Image.open(io.BytesIO(half.crop_png)).size == (320, 240) and half.image_id == image_id
    assert half.box.norm1000.x1 == pytest.approx(500) and half.box.input.x2 > half.box.input.x1 > 0
    inner = call(service, "ZoomRegion", _zoom(image_id, (0, 0, 500, 500), pb.COORD_SPACE_NORM1000,
                                              crop_id=half.crop_id))[0]
    assert (inner.box.original.x1, inner.box.original.y1, inner.box.original.x2) == (320, 240, 480)
    tiny = call(service, "ZoomRegion", _zoom(image_id, (100, 100, 105, 104)))[0]
    assert (tiny.crop_width, tiny.crop_height) == (28, 28)
    assert not tiny.HasField("answer") and tiny.visual_tokens.coarse == 0  # no question, no model work


def test_crops_per_image_are_limited_and_existing_crops_stay_usable(service):
    image_id = _upload(service, png(make_image(300, 300, seed=24)))
    for i in range(4):
        assert status(service, "ZoomRegion", _zoom(image_id, (10 * i, 0, 10 * i + 60, 60)))[0] == grpc.StatusCode.OK
    code, details = status(service, "ZoomRegion", _zoom(image_id, (50, 0, 110, 60)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 4" in details and "existing crop_id" in details
    assert call(service, "ZoomRegion", _zoom(image_id, (20, 0, 80, 60)))[0].crop_width == 60  # not a new crop
    assert status(service, "ZoomRegion", _zoom(_upload(service), (0, 0, 60, 60)))[0] == grpc.StatusCode.OK


# -- what goes to the zoom side ---------------------------------------------------------------------------


def test_answer_hands_the_zoom_side_the_prepared_request_and_the_coarse_features(engine, store, metrics):
    handed = []

    async def zoom_plan(prepared, plan):
        handed.append((prepared, plan))
        return await asyncio.to_thread(engine.zoom, prepared, plan)

    async def answer_box(request, box):
        raise AssertionError("Answer never answers a box")

    service = QZoomServicer(engine, store, zoom_plan, answer_box, metrics=metrics)
    direct = call(service, "Answer", _answer(mode=pb.MODE_DIRECT))[0]
    assert direct.route == pb.ROUTE_DIRECT and not handed
    zoom = call(service, "Answer", _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5))[0]
    ((prepared, plan),) = handed
    assert prepared.pixel_values.numel() == 0 and prepared.original.size == (640, 480)
    assert plan.coarse is not None and plan.coarse.embeds.shape[0] == zoom.visual_tokens.coarse
    assert zoom.route == pb.ROUTE_ZOOM and zoom.visual_tokens.zoom > 0 and zoom.roi_source == "sd_rpn"
    assert "vision_coarse" not in zoom.timings_ms  # the zoom side ran no coarse vision tower
    assert zoom.cache_hit == ("coarse.vision_coarse" not in zoom.timings_ms)  # the coarse pass's, as it was
    assert zoom.roi_map.rows * zoom.roi_map.cols == len(zoom.roi_map.values) == zoom.visual_tokens.coarse
    assert [m for _, m, _ in metrics.results] == ["direct", "zoom"]
    assert metrics.results[0][2] == (644 // 28) * (476 // 28)  # the 640x480 original at full resolution


def test_a_zoom_region_question_sends_the_decoded_image_not_the_bytes(engine, store):
    handed = []

    async def answer_box(request, box):
        handed.append((request, box))
        return await asyncio.to_thread(servicer_module.answer_box, engine, request, box)

    service = QZoomServicer(engine, store, zoom_plan=None, answer_box=answer_box)
    image_id = _upload(service)
    z = call(service, "ZoomRegion", _zoom(image_id, (100, 80, 300, 260), question="What digit is there?"))[0]
    ((request, box),) = handed
    assert isinstance(request.image, Image.Image) and request.image_id == image_id and box == (100, 80, 300, 260)
    assert z.HasField("answer") and z.visual_tokens.zoom > 0 and len(z.generated_ids) > 0
    assert (z.crop_width, z.crop_height) == (200, 180)


def test_answers_by_image_id_equal_answers_inline(service):
    image_id = _upload(service)
    inline = call(service, "Answer", _answer(gate_threshold=0.0, roi_threshold=0.5))[0]
    by_id = call(service, "Answer", _answer(image_id=image_id, gate_threshold=0.0, roi_threshold=0.5))[0]
    assert inline.image_id == by_id.image_id == image_id
    assert (by_id.generated_ids, by_id.roi_box, by_id.route) == (inline.generated_ids, inline.roi_box, inline.route)


# -- the error boundary ---------------------------------------------------------------------------------


def test_typed_errors_from_the_zoom_side_keep_their_code(engine, store, metrics):
    async def full(prepared, plan):
        raise Overloaded("the zoom pool is at capacity; retry shortly")

    async def quota(request, box):
        raise LimitExceeded("used up")

    service = QZoomServicer(engine, store, full, quota, metrics=metrics)
    assert status(service, "Answer", _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "the zoom pool is at capacity; retry shortly")
    image_id = _upload(service)
    assert status(service, "ZoomRegion", _zoom(image_id, question="q?"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert metrics.errors == [("Answer", "RESOURCE_EXHAUSTED"), ("ZoomRegion", "RESOURCE_EXHAUSTED")]


def test_unexpected_errors_are_logged_and_answered_internal_with_a_request_id(engine, store, metrics, caplog):
    async def broken(*_):
        raise RuntimeError("a bug with a secret path /srv/model")

    service = QZoomServicer(engine, store, broken, broken, metrics=metrics)
    caplog.set_level(logging.ERROR, logger="ray.serve")
    response, ctx = call(service, "Answer", _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5), request_id="req-77")
    assert ctx.code == grpc.StatusCode.INTERNAL and ctx.details == "internal error (request id req-77)"
    assert response == pb.AnswerResponse()  # an empty message of the RPC's own type, no trace
    assert any("req-77" in r.getMessage() and r.exc_info for r in caplog.records)
    _, anonymous = call(service, "Answer", _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5))
    assert anonymous.code == grpc.StatusCode.INTERNAL and "request id " in anonymous.details
    assert "bound method" not in anonymous.details and "secret" not in anonymous.details
    assert status(service, "Answer", _answer(mode=pb.MODE_DIRECT))[0] == grpc.StatusCode.OK  # still serving
    assert metrics.errors == [("Answer", "INTERNAL")] * 2


def test_health_reports_the_model_and_the_store(service, engine):
    health = call(service, "Health", pb.HealthRequest())[0]
    assert health.model_loaded and health.cache_reachable and health.cache_backend == "memory"
    assert health.model_id == engine.loaded.model_id and health.version


def test_every_call_is_timed_and_the_stores_counts_are_handed_over(service, metrics):
    _upload(service)
    status(service, "Answer", _answer(image_id="0" * 64))
    assert [(m, c) for m, c, _ in metrics.requests] == [("UploadImage", "OK"), ("Answer", "NOT_FOUND")]
    assert all(seconds > 0 for _, _, seconds in metrics.requests)
    assert len(metrics.cache_stats) == 2 and metrics.cache_stats[-1]["requests"][("image", "miss")] == 1


# -- grpc.health.v1 ------------------------------------------------------------------------------------


def test_standard_health_check_serves_both_names_and_refuses_others(engine, store):
    secured = in_process(engine, store, api_keys=KEYS)  # probes send no key
    for name in ("", "qzoom.v1.QZoomService"):
        response, ctx = call(secured, "Check", health_pb2.HealthCheckRequest(service=name))
        assert (ctx.code, response.status) == (grpc.StatusCode.OK, health_pb2.HealthCheckResponse.SERVING)
    response, ctx = call(secured, "Check", health_pb2.HealthCheckRequest(service="qzoom.v1.Other"))
    assert ctx.code == grpc.StatusCode.NOT_FOUND and "qzoom.v1.Other" in ctx.details


def test_a_cuda_error_turns_the_replica_not_serving_and_a_plain_bug_does_not(engine, store):
    failures = [RuntimeError("a bug"), torch.AcceleratorError("CUDA error: an illegal memory access")]

    async def broken(*_):
        raise failures.pop(0)

    service = QZoomServicer(engine, store, broken, broken)
    check = health_pb2.HealthCheckRequest(service="qzoom.v1.QZoomService")
    assert status(service, "Answer", _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5))[0] == grpc.StatusCode.INTERNAL
    assert call(service, "Check", check)[0].status == health_pb2.HealthCheckResponse.SERVING
    assert status(service, "Answer", _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5))[0] == grpc.StatusCode.INTERNAL
    assert call(service, "Check", check)[0].status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not call(service, "Health", pb.HealthRequest())[0].model_loaded
    assert "illegal memory access" in service.health.fatal


def test_watch_sends_the_status_then_each_change(engine, store):
    service = in_process(engine, store)
    service.health.poll_s = 0.01

    async def watch(name, n, after_first=None):
        seen = []
        async for response in service.Watch(health_pb2.HealthCheckRequest(service=name), Context()):
            seen.append(response.status)
            if after_first:
                after_first()
            if len(seen) == n:
                return seen

    def break_it():
        service.health.note_failure(torch.AcceleratorError("CUDA error: device-side assert triggered"))

    S = health_pb2.HealthCheckResponse
    assert asyncio.run(asyncio.wait_for(watch("", 2, break_it), 5)) == [S.SERVING, S.NOT_SERVING]
    assert asyncio.run(asyncio.wait_for(watch("nope", 1), 5)) == [S.SERVICE_UNKNOWN]


# -- a real gRPC server around the plain servicer ------------------------------------------------------------


def test_the_servicer_serves_real_grpc_clients(service):
    from qzoom_client import QZoomClient, QZoomClientError
    from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), None

    async def serve():
        nonlocal stop
        server = grpc.aio.server()
        pb_grpc.add_QZoomServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = asyncio.Event()
        addresses.append(f"127.0.0.1:{port}")
        started.set()
        await stop.wait()
        await server.stop(None)

    addresses = []
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        with QZoomClient(addresses[0], timeout=60, retries=0) as client:
            up = client.upload_image(IMAGE)
            zoom = client.zoom_region(up.image_id, [0, 0, 500, 500], space="norm1000")
            assert zoom.box["original"] == [0, 0, 320, 240] and zoom.crop_id.startswith("crop-")
            with pytest.raises(QZoomClientError) as missing:
                client.answer("f" * 64, "q?")
            assert missing.value.code == "NOT_FOUND" and "unknown image_id" in missing.value.details
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)

"""The service as clients see it: a real local Ray Serve app, real gRPC on localhost, real Redis.

One Ray cluster serves five applications of the same code with different settings (selected with the
`application` metadata): `main` (Redis cache under a test prefix), `secured` (API keys), `noredis`
(Redis URL pointing at a closed port), `busy` (a queue of two) and `slow` (one request at a time, for
the proxy's request timeout).
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import os
import socket
import time
import urllib.request
import uuid
from dataclasses import dataclass

import grpc
import pytest
import redis
from PIL import Image

from qzoom_service._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_service._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

from ..helpers import TINY_BUDGET, make_image

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from qzoom_service.serve.app import SERVICER_FUNCTION, build_app  # noqa: E402
from qzoom_service.serve.run import wait_until_healthy  # noqa: E402

REQUEST_TIMEOUT_S = 8.0
KEYS = "key-one,key-two"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Service:
    address: str
    metrics_port: int
    prefix: str

    def stub(self):
        return pb_grpc.QZoomServiceStub(grpc.insecure_channel(self.address))

    def call(self, method: str, request, app: str = "main", key: str | None = None, timeout: float = 30):
        metadata = [("application", app)] + ([("authorization", f"Bearer {key}")] if key else [])
        return getattr(self.stub(), method)(request, metadata=metadata, timeout=timeout)

    def status(self, method: str, request, app: str = "main", **kw) -> tuple[grpc.StatusCode, str]:
        try:
            self.call(method, request, app=app, **kw)
        except grpc.RpcError as e:
            return e.code(), e.details()
        return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    if not redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1).ping():
        pytest.skip("no Redis at 127.0.0.1:6379")
    os.environ["RAY_metrics_report_interval_ms"] = "500"
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    prefix = f"qzoom-test-{uuid.uuid4().hex[:8]}:"
    ray.init(num_cpus=8, include_dashboard=False, _metrics_export_port=metrics_port, log_to_driver=False,
             namespace=f"qzoom-test-{uuid.uuid4().hex[:6]}")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION],
                                  "request_timeout_s": REQUEST_TIMEOUT_S})
        base = {"model": str(tiny_checkpoint), "max_new_tokens": 6, "max_image_bytes": 3_000_000,
                "max_image_pixels": 20_000_000, **TINY_BUDGET}
        small = {"ray_actor_options": {"num_cpus": 0.25}}
        apps = {
            "main": ({**base, "redis_url": "redis://127.0.0.1:6379/15", "cache_prefix": prefix,
                      "max_crops_per_image": 6}, {}),
            "secured": (base, {"CoarseGate": {"ray_actor_options": {
                "num_cpus": 0.25, "runtime_env": {"env_vars": {"QZOOM_API_KEYS": KEYS}}}}}),
            "noredis": ({**base, "redis_url": "redis://127.0.0.1:1/0"}, {}),
            "busy": (base, {"CoarseGate": {**small, "max_ongoing_requests": 1, "max_queued_requests": 2}}),
            "slow": (base, {"CoarseGate": {**small, "max_ongoing_requests": 1}}),
            "zoombusy": (base, {"Zoom": {**small, "max_ongoing_requests": 1, "max_queued_requests": 1}}),
        }
        for name, (args, deployments) in apps.items():
            options = {"CoarseGate": small, "Zoom": small, **deployments}
            serve.run(build_app(args, options), name=name, route_prefix=f"/{name}", blocking=False)
        address = f"127.0.0.1:{grpc_port}"
        for name in apps:
            wait_until_healthy(address, timeout_s=240, application=name)
        yield Service(address, metrics_port, prefix)
    finally:
        serve.shutdown()
        ray.shutdown()
        client = redis.Redis(host="127.0.0.1", port=6379, db=15)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


IMAGE = _png(make_image(640, 480, seed=21))


def _answer(image=None, image_id=None, question="What colour is the box?", **options):
    source = {"image_id": image_id} if image_id else {"image": image if image is not None else IMAGE}
    return pb.AnswerRequest(question=question, options=pb.AnswerOptions(**options), **source)


def test_answer_on_both_forced_routes(service):
    direct = service.call("Answer", _answer(mode=pb.MODE_DIRECT))
    assert direct.route == pb.ROUTE_DIRECT and not direct.HasField("gate_score") and not direct.HasField("roi_box")
    assert direct.visual_tokens.coarse > 0 and direct.visual_tokens.zoom == 0 and len(direct.generated_ids) > 0
    zoom = service.call("Answer", _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5))
    assert zoom.route == pb.ROUTE_ZOOM and zoom.visual_tokens.zoom > 0 and zoom.roi_source == "sd_rpn"
    box = zoom.roi_box
    assert 0 <= box.original.x1 < box.original.x2 <= 640 and 0 <= box.original.y1 < box.original.y2 <= 480
    assert math.isclose(box.norm1000.x2, box.original.x2 / 640 * 1000) and math.isclose(box.norm1.y1, box.original.y1 / 480)
    assert zoom.roi_map.rows * zoom.roi_map.cols == len(zoom.roi_map.values) == zoom.visual_tokens.coarse
    auto = service.call("Answer", _answer(gate_threshold=0.0, roi_threshold=0.5))
    assert auto.HasField("gate_score") and 0.0 <= auto.gate_score <= 1.0 and auto.route == pb.ROUTE_ZOOM


def test_upload_once_then_zoom_regions_reuse_the_cached_coarse_features(service):
    image = _png(make_image(500, 400, seed=22))
    first = service.call("UploadImage", pb.UploadImageRequest(image=image))
    again = service.call("UploadImage", pb.UploadImageRequest(image=image))
    assert first.image_id == again.image_id and len(first.image_id) == 64
    assert (first.already_stored, again.already_stored) == (False, True)
    assert (first.width, first.height) == (500, 400) and first.input_width % 28 == 0
    zooms = [service.call("ZoomRegion", pb.ZoomRegionRequest(
        image_id=first.image_id, box=pb.Box(x1=100, y1=80, x2=300, y2=260), space=pb.COORD_SPACE_ORIGINAL,
        question="What digit is there?")) for _ in range(3)]
    assert [z.cache_hit for z in zooms] == [False, True, True]
    assert len({tuple(z.generated_ids) for z in zooms}) == 1 and zooms[0].answer is not None
    crop = Image.open(io.BytesIO(zooms[0].crop_png))
    assert crop.size == (200, 180) == (zooms[0].crop_width, zooms[0].crop_height)
    assert _metric(service, "qzoom_feature_cache_lookups_total", 'result="hit"', at_least=2) >= 2


def test_answers_are_identical_with_and_without_the_cache(service):
    request = _answer(image=_png(make_image(600, 420, seed=23)), gate_threshold=0.0, roi_threshold=0.5)
    cold = service.call("Answer", request)
    warm = service.call("Answer", request)
    uncached = service.call("Answer", request, app="noredis")
    assert (cold.cache_hit, warm.cache_hit, uncached.cache_hit) == (False, True, False)
    for other in (warm, uncached):
        assert other.generated_ids == cold.generated_ids and other.route == cold.route
        assert other.roi_box == cold.roi_box and other.gate_score == pytest.approx(cold.gate_score)


def test_redis_unreachable_still_answers(service):
    health = service.call("Health", pb.HealthRequest(), app="noredis")
    assert health.model_loaded and not health.cache_reachable and health.cache_backend == "redis"
    answer = service.call("Answer", _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5), app="noredis")
    assert answer.route == pb.ROUTE_ZOOM and answer.visual_tokens.zoom > 0
    code, details = service.status("UploadImage", pb.UploadImageRequest(image=IMAGE), app="noredis")
    assert code == grpc.StatusCode.UNAVAILABLE and "image store" in details
    assert service.call("Health", pb.HealthRequest()).cache_reachable


def _bomb() -> bytes:
    import struct
    import zlib

    data = bytearray(_png(Image.new("RGB", (8, 8))))
    data[16:24] = struct.pack(">II", 5000, 5000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bad_input_gets_its_status_code_and_nothing_stored_is_lost(service):
    kept = service.call("UploadImage", pb.UploadImageRequest(image=IMAGE)).image_id
    box = {"image_id": kept, "space": pb.COORD_SPACE_ORIGINAL}
    cases = [
        ("Answer", _answer(image=b"\x89PNG garbage"), grpc.StatusCode.INVALID_ARGUMENT, "not a readable image"),
        ("Answer", _answer(image=IMAGE[: len(IMAGE) // 3]), grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("Answer", _answer(image=b"\0" * 3_100_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit is 3000000"),
        ("UploadImage", pb.UploadImageRequest(image=_bomb()), grpc.StatusCode.RESOURCE_EXHAUSTED, "25000000 pixels"),
        ("Answer", _answer(image_id="0" * 64), grpc.StatusCode.NOT_FOUND, "unknown image_id"),
        ("Answer", _answer(question="  "), grpc.StatusCode.INVALID_ARGUMENT, "question is empty"),
        ("Answer", _answer(gate_threshold=2.0), grpc.StatusCode.INVALID_ARGUMENT, "gate_threshold"),
        ("ZoomRegion", pb.ZoomRegionRequest(box=pb.Box(x1=300, y1=10, x2=100, y2=90), **box),
         grpc.StatusCode.INVALID_ARGUMENT, "inverted"),
        ("ZoomRegion", pb.ZoomRegionRequest(box=pb.Box(x1=10, y1=10, x2=10, y2=90), **box),
         grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ("ZoomRegion", pb.ZoomRegionRequest(box=pb.Box(x1=float("nan"), y1=0, x2=5, y2=5), **box),
         grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        ("ZoomRegion", pb.ZoomRegionRequest(box=pb.Box(x1=700, y1=500, x2=900, y2=600), **box),
         grpc.StatusCode.INVALID_ARGUMENT, "outside"),
        ("ZoomRegion", pb.ZoomRegionRequest(image_id=kept, box=pb.Box(x1=1, y1=1, x2=50, y2=50)),
         grpc.StatusCode.INVALID_ARGUMENT, "coordinate space"),
        ("ZoomRegion", pb.ZoomRegionRequest(image_id=kept, box=pb.Box(x1=1, y1=1, x2=50, y2=50), space=42),
         grpc.StatusCode.INVALID_ARGUMENT, "coordinate space"),
        ("ZoomRegion", pb.ZoomRegionRequest(question="why? " * 1000, box=pb.Box(x1=0, y1=0, x2=90, y2=90), **box),
         grpc.StatusCode.INVALID_ARGUMENT, "question has 5000 characters"),  # raised inside the Zoom deployment
        ("ZoomRegion", pb.ZoomRegionRequest(crop_id="crop-nope", box=pb.Box(x1=0, y1=0, x2=1, y2=1),
                                            space=pb.COORD_SPACE_NORM1, image_id=kept),
         grpc.StatusCode.NOT_FOUND, "unknown crop_id"),
    ]
    for method, request, code, text in cases:
        got, details = service.status(method, request)
        assert (got, text in details) == (code, True), (method, text, got, details)
    assert service.call("Answer", _answer(image_id=kept, mode=pb.MODE_DIRECT)).answer is not None  # still there


def test_clamped_box_and_every_space_of_a_zoom_region(service):
    image_id = service.call("UploadImage", pb.UploadImageRequest(image=IMAGE)).image_id
    z = service.call("ZoomRegion", pb.ZoomRegionRequest(image_id=image_id, box=pb.Box(x1=500, y1=400, x2=800, y2=700),
                                                        space=pb.COORD_SPACE_ORIGINAL))
    assert (z.box.original.x1, z.box.original.y1, z.box.original.x2, z.box.original.y2) == (500, 400, 640, 480)
    n = service.call("ZoomRegion", pb.ZoomRegionRequest(image_id=image_id, box=pb.Box(x1=0.5, y1=0.5, x2=1, y2=1),
                                                        space=pb.COORD_SPACE_NORM1))
    assert (n.box.original.x1, n.box.original.y1, n.crop_width, n.crop_height) == (320, 240, 320, 240)
    inner = service.call("ZoomRegion", pb.ZoomRegionRequest(image_id=image_id, crop_id=n.crop_id,
                                                            box=pb.Box(x1=0, y1=0, x2=500, y2=500),
                                                            space=pb.COORD_SPACE_NORM1000))
    assert (inner.box.original.x1, inner.box.original.y1, inner.box.original.x2) == (320, 240, 480)


def test_crops_per_image_are_limited_and_existing_crops_stay_usable(service):
    image_id = service.call("UploadImage", pb.UploadImageRequest(image=_png(make_image(300, 300, seed=24)))).image_id

    def crop(i):
        box = pb.Box(x1=10 * i, y1=0, x2=10 * i + 60, y2=60)
        return pb.ZoomRegionRequest(image_id=image_id, box=box, space=pb.COORD_SPACE_ORIGINAL)

    for i in range(6):
        service.call("ZoomRegion", crop(i))
    code, details = service.status("ZoomRegion", crop(6))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 6" in details and "existing crop_id" in details
    assert service.call("ZoomRegion", crop(2)).crop_width == 60  # an existing crop is not a new one
    tiny = service.call("ZoomRegion", pb.ZoomRegionRequest(image=IMAGE, box=pb.Box(x1=100, y1=100, x2=105, y2=104),
                                                           space=pb.COORD_SPACE_ORIGINAL))
    assert (tiny.crop_width, tiny.crop_height) == (28, 28)  # grown to the minimum side


def test_api_keys_are_checked_at_the_ingress(service):
    request = _answer(mode=pb.MODE_DIRECT)
    assert service.status("Answer", request, app="secured")[0] == grpc.StatusCode.UNAUTHENTICATED
    code, details = service.status("Answer", request, app="secured", key="wrong")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid API key" in details
    assert service.call("Answer", request, app="secured", key="key-two").route == pb.ROUTE_DIRECT
    assert service.call("Answer", request).route == pb.ROUTE_DIRECT  # auth off on `main`


def _flood(service, app: str, n: int, request=None) -> list[tuple[grpc.StatusCode, str]]:
    request = request or _answer(mode=pb.MODE_DIRECT)
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _: service.status("Answer", request, app=app, timeout=60), range(n)))


def test_a_full_queue_answers_resource_exhausted_and_the_service_recovers(service):
    codes = [code for code, _ in _flood(service, "busy", 16)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert service.status("Answer", _answer(mode=pb.MODE_DIRECT), app="busy")[0] == grpc.StatusCode.OK


def test_a_full_zoom_queue_answers_resource_exhausted(service):
    outcomes = _flood(service, "zoombusy", 12, _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5))
    full = [details for code, details in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert full and all("zoom pool is at capacity" in d for d in full)
    assert grpc.StatusCode.OK in [code for code, _ in outcomes]


def test_requests_past_the_proxy_timeout_answer_deadline_exceeded(service):
    started = time.monotonic()
    codes = [code for code, _ in _flood(service, "slow", 96)]
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes, (codes, time.monotonic() - started)
    assert grpc.StatusCode.OK in codes


def _metric(service, name: str, label: str, at_least: float = 1e-9, wait_s: float = 20.0) -> float:
    """Sum of a Ray-exported metric's samples carrying `label` (Ray prefixes names with `ray_`), polled until
    it reaches `at_least`: Ray exports on an interval, so a fresh increment shows up after a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
        total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith(f"ray_{name}") and label in line)
        if total >= at_least or time.monotonic() > deadline:
            return total
        time.sleep(0.5)


def test_metrics_count_routes_tokens_and_tokens_saved(service):
    service.call("Answer", _answer(mode=pb.MODE_DIRECT))
    service.call("Answer", _answer(mode=pb.MODE_ZOOM, roi_threshold=0.5))
    assert _metric(service, "qzoom_route_total", 'route="direct"', at_least=1) >= 1
    assert _metric(service, "qzoom_route_total", 'route="zoom"', at_least=1) >= 1
    assert _metric(service, "qzoom_stage_latency_ms_count", 'stage="total"', at_least=2) >= 2
    processed = _metric(service, "qzoom_visual_tokens_total", 'pass="coarse"')
    baseline = _metric(service, "qzoom_baseline_visual_tokens_total", "")
    assert baseline > processed > 0  # a 640x480 image at full resolution has more tokens than the coarse view

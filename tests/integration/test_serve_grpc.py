"""The service as clients see it through Ray: a real Serve app, real gRPC on localhost, real Redis.

What needs no Ray (auth rules, status codes, crop logic) is tested on the plain servicer
(tests/unit/test_servicer.py). Here: the two deployments wired together, what crosses between them, the
cache shared across them, queues, the proxy's timeout and the metrics Ray exports. Ray starts once per
session: these applications are deployed onto the session's `qzoom serve` (tests/serving.py), selected
with the `application` metadata: `main` (Redis cache under a test prefix), `secured` (API keys, in-process
cache), `noredis` (Redis URL pointing at a closed port), `busy` (a queue of two), `slow` (one request at
a time, for the proxy's request timeout) and `zoombusy` (a Zoom queue of one). They are added to the
running Serve config through the dashboard's REST API, the way `qzoom serve` deployed its own.
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import time
import urllib.request
import uuid
from dataclasses import dataclass

import grpc
import pytest
import redis
from PIL import Image
from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

from ..helpers import TINY_BUDGET, make_image, png
from .conftest import REDIS_URL, redis_reachable

pytest.importorskip("ray")
from qzoom_service.serve.run import deploy, undeploy, wait_until_deployed, wait_until_healthy  # noqa: E402
from qzoom_service.serve.settings import IMPORT_PATH  # noqa: E402

KEYS = "key-one,key-two"



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
def service(qzoom_service, tiny_checkpoint):
    if not redis_reachable(REDIS_URL):
        pytest.skip(f"no Redis at {REDIS_URL}")
    prefix = f"qzoom-test-{uuid.uuid4().hex[:8]}:"
    base = {"model": str(tiny_checkpoint), "max_new_tokens": 6, "max_image_bytes": 3_000_000,
            "max_image_pixels": 20_000_000, **TINY_BUDGET}
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    apps = {
        "main": ({**base, "redis_url": REDIS_URL, "cache_prefix": prefix, "max_crops_per_image": 6}, {}),
        "secured": (base, {"CoarseGate": {"ray_actor_options": {
            "num_cpus": 0.25, "runtime_env": {"env_vars": {"QZOOM_API_KEYS": KEYS}}}}}),
        "noredis": ({**base, "redis_url": "redis://127.0.0.1:1/0"}, {}),
        # Each request a few times slower than on `main` (a larger coarse view), one at a time.
        "slow": ({**base, "min_pixels": 400 * 784, "max_pixels": 400 * 784},
                 {"CoarseGate": {**small, "max_ongoing_requests": 1}}),
        "zoombusy": (base, {"Zoom": {**small, "max_ongoing_requests": 1, "max_queued_requests": 1}}),
    }
    config = {"applications": [
        {"name": name, "route_prefix": f"/{name}", "import_path": IMPORT_PATH, "args": args,
         "deployments": [{"name": d, **{**small, **deployments.get(d, {})}} for d in ("CoarseGate", "Zoom")]}
        for name, (args, deployments) in apps.items()]}
    try:
        deploy(qzoom_service.dashboard, config)
        wait_until_deployed(qzoom_service.dashboard, list(apps), timeout_s=300)
        for name in apps:
            wait_until_healthy(qzoom_service.address, timeout_s=60, application=name)
        yield Service(qzoom_service.address, qzoom_service.metrics_port, prefix)
    finally:
        undeploy(qzoom_service.dashboard, set(apps))  # the session's own `qzoom` application keeps serving
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


IMAGE = png(make_image(640, 480, seed=21))


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
    image = png(make_image(500, 400, seed=22))
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
    request = _answer(image=png(make_image(600, 420, seed=23)), gate_threshold=0.0, roi_threshold=0.5)
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


def test_typed_errors_keep_their_code_through_the_proxy_and_from_inside_the_zoom_deployment(service):
    kept = service.call("UploadImage", pb.UploadImageRequest(image=IMAGE)).image_id
    cases = [
        ("Answer", _answer(image=b"\x89PNG garbage"), grpc.StatusCode.INVALID_ARGUMENT, "not a readable image"),
        ("Answer", _answer(image_id="0" * 64), grpc.StatusCode.NOT_FOUND, "unknown image_id"),
        # Raised in the Zoom replica: a RayTaskError there, its own status here.
        ("ZoomRegion", pb.ZoomRegionRequest(question="why? " * 1000, box=pb.Box(x1=0, y1=0, x2=90, y2=90),
                                            image_id=kept, space=pb.COORD_SPACE_ORIGINAL),
         grpc.StatusCode.INVALID_ARGUMENT, "question has 5000 characters"),
    ]
    for method, request, code, text in cases:
        got, details = service.status(method, request)
        assert (got, text in details) == (code, True), (method, text, got, details)
    assert service.call("Answer", _answer(image_id=kept, mode=pb.MODE_DIRECT)).answer is not None  # still there


def test_a_zoom_travels_once_the_zoom_replica_runs_no_coarse_vision_tower(service):
    # `secured` has no Redis: each replica has its own in-process cache, so only what travels with the
    # plan can spare the Zoom replica the coarse vision tower.
    request = _answer(image=png(make_image(520, 390, seed=25)), mode=pb.MODE_ZOOM, roi_threshold=0.5)
    cold, warm = (service.call("Answer", request, app="secured", key="key-one") for _ in range(2))
    assert (cold.route, warm.route) == (pb.ROUTE_ZOOM, pb.ROUTE_ZOOM) and (cold.cache_hit, warm.cache_hit) == (False,
                                                                                                               True)
    assert "vision_coarse" not in cold.timings_ms and "coarse.vision_coarse" in cold.timings_ms
    assert "vision_coarse" not in warm.timings_ms and "coarse.vision_coarse" not in warm.timings_ms
    assert warm.generated_ids == cold.generated_ids and warm.roi_box == cold.roi_box


def test_crops_per_image_are_limited_and_existing_crops_stay_usable(service):
    image_id = service.call("UploadImage", pb.UploadImageRequest(image=png(make_image(300, 300, seed=24)))).image_id

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


def test_api_keys_from_the_replicas_environment_are_checked_on_metadata_through_the_proxy(service):
    request = _answer(mode=pb.MODE_DIRECT)
    code, details = service.status("Answer", request, app="secured", key="wrong")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid API key" in details
    assert service.call("Answer", request, app="secured", key="key-two").route == pb.ROUTE_DIRECT
    assert service.call("Answer", request).route == pb.ROUTE_DIRECT  # auth off on `main`


def _flood(service, app: str, n: int, request=None) -> list[tuple[grpc.StatusCode, str]]:
    request = request or _answer(mode=pb.MODE_DIRECT)
    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _: service.status("Answer", request, app=app, timeout=60), range(n)))


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
    assert _metric(service, "qzoom_stage_duration_seconds_count", 'stage="total"', at_least=2) >= 2
    processed = _metric(service, "qzoom_visual_tokens_total", 'pass="coarse"')
    baseline = _metric(service, "qzoom_baseline_visual_tokens_total", "")
    assert baseline > processed > 0  # a 640x480 image at full resolution has more tokens than the coarse view

"""Dynamic batching through Ray: concurrent Answer (zoom route, so both deployments batch) and ZoomRegion
questions, each on its own image size, get what the same request gets alone. Deployed onto the session's
`qzoom serve` as application `batching` (tiny model, in-process caches), as test_serve_grpc.py does."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

from ..helpers import TINY_BUDGET, make_image, png

pytest.importorskip("ray")
from qzoom_service.serve.run import deploy, undeploy, wait_until_deployed, wait_until_healthy  # noqa: E402
from qzoom_service.serve.settings import IMPORT_PATH  # noqa: E402

APP = "batching"
SIZES = [(640, 480), (300, 520), (700, 260), (420, 420), (520, 360), (360, 600), (600, 300), (480, 480)]


@pytest.fixture(scope="module")
def address(qzoom_service, tiny_checkpoint):
    args = {"model": str(tiny_checkpoint), "max_new_tokens": 6, "max_batch_size": 8, **TINY_BUDGET}
    config = {"applications": [{
        "name": APP, "route_prefix": f"/{APP}", "import_path": IMPORT_PATH, "args": args,
        "deployments": [{"name": d, "ray_actor_options": {"num_cpus": 0.25}} for d in ("CoarseGate", "Zoom")]}]}
    try:
        deploy(qzoom_service.dashboard, config)
        wait_until_deployed(qzoom_service.dashboard, [APP], timeout_s=300)
        wait_until_healthy(qzoom_service.address, timeout_s=60, application=APP)
        yield qzoom_service.address
    finally:
        undeploy(qzoom_service.dashboard, {APP})


def _call(address, method, request):
    stub = pb_grpc.QZoomServiceStub(grpc.insecure_channel(address))
    return getattr(stub, method)(request, metadata=[("application", APP)], timeout=60)


def _answers():
    return [pb.AnswerRequest(image=png(make_image(w, h, seed=40 + i)), question="Which digit?",
                             options=pb.AnswerOptions(mode=pb.MODE_ZOOM, roi_threshold=0.5))
            for i, (w, h) in enumerate(SIZES)]


def _zoom_regions():
    return [pb.ZoomRegionRequest(image=png(make_image(w, h, seed=60 + i)), box=pb.Box(x1=20, y1=30, x2=250, y2=200),
                                 space=pb.COORD_SPACE_ORIGINAL, question="What colour?")
            for i, (w, h) in enumerate(SIZES[:4])]


def _box(box_set):
    return box_set.original.x1, box_set.original.y1, box_set.original.x2, box_set.original.y2


def _key(response):
    tokens = (tuple(response.generated_ids), response.answer, response.visual_tokens.coarse,
              response.visual_tokens.zoom)
    if isinstance(response, pb.ZoomRegionResponse):
        return (*tokens, _box(response.box))
    return (*tokens, response.route, _box(response.roi_box))


def test_concurrent_requests_get_what_each_gets_alone(address):
    calls = [("Answer", r) for r in _answers()] + [("ZoomRegion", r) for r in _zoom_regions()]
    alone = [_call(address, method, request) for method, request in calls]
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        together = list(pool.map(lambda call: _call(address, *call), calls))
    assert all(r.route == pb.ROUTE_ZOOM for r in alone[:len(SIZES)])
    assert len({r.visual_tokens.coarse for r in alone[:len(SIZES)]}) > 4  # really different sizes in a batch
    assert [_key(r) for r in together] == [_key(r) for r in alone]

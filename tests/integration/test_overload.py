"""Overload and oversized messages through the real Serve proxy: refused fast, and the service keeps serving.

`qzoom serve`'s own defaults (backpressure, a request timeout, the proxy's message limit) are checked on
its plan without Ray; the refusals themselves on the session's cluster (tests/serving.py), whose proxy
got the message limit `qzoom serve` would set on a cluster of its own.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

from qzoom_service.config import EngineConfig
from qzoom_service.serve.run import plan_local, proxy_message_limit
from qzoom_service.serve.settings import IMPORT_PATH, grpc_message_limit

from ..helpers import TINY_BUDGET, free_port, make_image, png

IMAGE = png(make_image(640, 480, seed=31))


def test_qzoom_serve_defaults_to_bounded_queues_a_request_timeout_and_a_message_limit():
    plan = plan_local(environ={}, grpc_port=free_port(), http_port=free_port(), dashboard_port=free_port())
    for deployment in plan.app["deployments"]:
        assert deployment["max_ongoing_requests"] >= 1 and deployment["max_queued_requests"] >= 1, deployment
    assert 0 < plan.config["grpc_options"]["request_timeout_s"] <= 600
    engine = EngineConfig()
    assert proxy_message_limit(plan) == grpc_message_limit(engine)
    assert engine.max_image_bytes < grpc_message_limit(engine) < engine.max_image_bytes + (4 << 20)


def _status(address: str, request, app: str, timeout: float = 60) -> tuple[grpc.StatusCode, float, str]:
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.QZoomServiceStub(channel).Answer(request, metadata=[("application", app)], timeout=timeout)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
    return code, time.monotonic() - started, details


@pytest.fixture(scope="module")
def tight(qzoom_service, tiny_checkpoint):
    """An application whose CoarseGate takes one request at a time and queues one more."""
    pytest.importorskip("ray")
    from qzoom_service.serve.run import deploy, undeploy, wait_until_deployed, wait_until_healthy

    args = {"model": str(tiny_checkpoint), "max_new_tokens": 6, **TINY_BUDGET}
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    config = {"applications": [{
        "name": "tight", "route_prefix": "/tight", "import_path": IMPORT_PATH, "args": args,
        "deployments": [{"name": "CoarseGate", **small, "max_ongoing_requests": 1, "max_queued_requests": 1},
                        {"name": "Zoom", **small}]}]}
    try:
        deploy(qzoom_service.dashboard, config)
        wait_until_deployed(qzoom_service.dashboard, ["tight"], timeout_s=300)
        wait_until_healthy(qzoom_service.address, timeout_s=60, application="tight")
        yield qzoom_service.address
    finally:
        undeploy(qzoom_service.dashboard, {"tight"})


def test_a_burst_past_the_queue_answers_resource_exhausted_within_a_second(tight):
    request = pb.AnswerRequest(image=IMAGE, question="What colour is the box?",
                               options=pb.AnswerOptions(mode=pb.MODE_DIRECT))
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(lambda _: _status(tight, request, "tight"), range(16)))
    refused = [seconds for code, seconds, _ in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert refused and max(refused) < 1.0, outcomes
    assert grpc.StatusCode.OK in [code for code, _, _ in outcomes]
    assert _status(tight, request, "tight")[0] == grpc.StatusCode.OK  # recovered


def test_a_message_over_the_proxys_limit_is_refused_before_the_application_sees_it(tight):
    limit = grpc_message_limit(EngineConfig())
    oversized = pb.AnswerRequest(image=b"\0" * (limit + (8 << 20)), question="q?")
    code, seconds, details = _status(tight, oversized, "tight")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details, (code, details)
    assert seconds < 10
    ok = pb.AnswerRequest(image=IMAGE, question="q?", options=pb.AnswerOptions(mode=pb.MODE_DIRECT))
    assert _status(tight, ok, "tight")[0] == grpc.StatusCode.OK

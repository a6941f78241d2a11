"""`grpc.health.v1.Health` through Ray Serve's gRPC proxy, called the way Kubernetes' gRPC probe and
`grpc_health_probe` call it: no metadata at all. And what such a probe sees when no replica can answer.

The session's `qzoom serve` (tests/serving.py) is the one application here, as in the chart; one test
deploys a second application whose replica never starts (it asks for a resource no node has: the state
of an app whose model is still loading or whose pod waits for a GPU node).
"""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..helpers import TINY_BUDGET

pytest.importorskip("ray")
from qzoom_service.serve.run import deploy, undeploy  # noqa: E402
from qzoom_service.serve.settings import IMPORT_PATH  # noqa: E402

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(address: str, service: str = "", metadata=None, timeout: float = 10) -> tuple[grpc.StatusCode, int | None]:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), metadata=metadata, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), None
    return grpc.StatusCode.OK, response.status


def test_a_probe_without_metadata_sees_serving_for_both_names_and_not_found_for_others(qzoom_service):
    for name in ("", "qzoom.v1.QZoomService"):
        assert check(qzoom_service.address, name) == (grpc.StatusCode.OK, SERVING), name
    assert check(qzoom_service.address, "qzoom.v1.Nope")[0] == grpc.StatusCode.NOT_FOUND


def test_watch_streams_serving_first(qzoom_service):
    with grpc.insecure_channel(qzoom_service.address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="qzoom.v1.QZoomService"), timeout=15)
        assert next(stream).status == SERVING
        stream.cancel()


def test_what_a_probe_sees_while_no_replica_is_up(qzoom_service, tiny_checkpoint):
    """A second app whose ingress replica cannot start: a probe that names it waits for its deadline (the
    kubelet counts that a failure), and with two apps a probe without metadata is not routed at all."""
    name = f"pending-{uuid.uuid4().hex[:6]}"
    never = {"ray_actor_options": {"num_cpus": 0.1, "resources": {"no-such-node": 1}}}
    # Declaratively, as the session's own app: the call returns once the app is created, not running.
    deploy(qzoom_service.dashboard, {"applications": [{
        "name": name, "route_prefix": f"/{name}", "import_path": IMPORT_PATH,
        "args": {"model": str(tiny_checkpoint), **TINY_BUDGET},
        "deployments": [{"name": d, **never} for d in ("CoarseGate", "Zoom")]}]})
    try:
        _until(lambda: check(qzoom_service.address)[0] == grpc.StatusCode.NOT_FOUND,  # two apps, no `application`
               "the proxy never learnt of the second app")
        assert check(qzoom_service.address, metadata=(("application", name),), timeout=3) == \
            (grpc.StatusCode.DEADLINE_EXCEEDED, None)
        assert check(qzoom_service.address, metadata=(("application", "qzoom"),)) == (grpc.StatusCode.OK, SERVING)
    finally:
        undeploy(qzoom_service.dashboard, {name})
    _until(lambda: check(qzoom_service.address) == (grpc.StatusCode.OK, SERVING),  # one app again: probes route
           "probes without metadata did not route again once the second app was gone")


def _until(condition, failure: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.5)


def test_local_qzoom_serve_offers_reflection_naming_both_services(qzoom_service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(qzoom_service.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10)
    names = {s.name for s in response.list_services_response.service}
    assert {"qzoom.v1.QZoomService", "grpc.health.v1.Health"} <= names

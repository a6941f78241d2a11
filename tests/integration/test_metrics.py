"""The metrics an operator scrapes, read from the real endpoint of the session's cluster (Ray's exporter
on the node's metrics port, `/metrics`): latencies in seconds with a route label, each call's latency and
status, the Zoom deployment's own series and the cache's operations."""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest
from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

from ..helpers import make_image, png

pytest.importorskip("ray")

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> list[tuple[str, dict, float]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples.append((match["name"], dict(_LABEL.findall(match["labels"] or "")), float(match["value"])))
    return samples


def total(samples, name: str, **labels) -> float:
    return sum(v for n, got, v in samples if n == name and all(got.get(k) == w for k, w in labels.items()))


def wait_for(port: int, name: str, at_least: float, **labels) -> list:
    """Ray exports on an interval: poll until the series reaches `at_least` (or give the last scrape)."""
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(port)
        if total(samples, name, **labels) >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


@pytest.fixture(scope="module")
def traffic(qzoom_service):
    """One upload, a direct and a zoomed answer about it, one failed call; then the scrape."""
    with grpc.insecure_channel(qzoom_service.address) as channel:
        stub = pb_grpc.QZoomServiceStub(channel)
        image_id = stub.UploadImage(pb.UploadImageRequest(image=png(make_image(400, 300, seed=41))),
                                    timeout=60).image_id
        for mode in (pb.MODE_DIRECT, pb.MODE_ZOOM):
            stub.Answer(pb.AnswerRequest(image_id=image_id, question="What colour is the box?",
                                         options=pb.AnswerOptions(mode=mode, roi_threshold=0.5)), timeout=60)
        with pytest.raises(grpc.RpcError):
            stub.Answer(pb.AnswerRequest(image_id="0" * 64, question="q?"), timeout=60)
    port = qzoom_service.metrics_port
    wait_for(port, "ray_qzoom_request_duration_seconds_count", 1, deployment="Zoom")
    return wait_for(port, "ray_qzoom_request_errors_total", 1, method="Answer", code="NOT_FOUND")


def test_latencies_are_histograms_in_seconds_and_nothing_is_in_milliseconds(traffic):
    names = {n for n, _, _ in traffic if n.startswith("ray_qzoom_")}
    assert "ray_qzoom_stage_duration_seconds_bucket" in names and "ray_qzoom_request_duration_seconds_bucket" in names
    assert not [n for n in names if "_ms" in n]
    buckets = {float(labels["le"]) for n, labels, _ in traffic
               if n == "ray_qzoom_request_duration_seconds_bucket" and labels["le"] != "+Inf"}
    assert min(buckets) == 0.005 and max(buckets) == 60  # seconds: 5 ms to a minute


def test_stage_latencies_carry_the_route(traffic):
    for route in ("direct", "zoom"):
        assert total(traffic, "ray_qzoom_stage_duration_seconds_count", stage="total", route=route) >= 1, route


def test_every_call_is_timed_with_its_status_on_the_ingress(traffic):
    def count(**labels):
        return total(traffic, "ray_qzoom_request_duration_seconds_count", deployment="CoarseGate", **labels)

    assert count(method="Answer", code="OK") >= 2 and count(method="UploadImage", code="OK") >= 1
    assert count(method="Answer", code="NOT_FOUND") >= 1
    assert total(traffic, "ray_qzoom_request_errors_total", method="Answer", code="NOT_FOUND") >= 1


def test_the_zoom_deployment_exports_its_own_series(traffic):
    assert total(traffic, "ray_qzoom_request_duration_seconds_count", deployment="Zoom", method="zoom", code="OK") >= 1
    assert total(traffic, "ray_qzoom_route_total", deployment="Zoom") == 0  # answers are counted once, by the ingress


def test_cache_operations_are_exported_by_kind_and_result(traffic):
    # The answers by image id read the uploaded image back; the unknown id missed.
    assert total(traffic, "ray_qzoom_cache_requests_total", backend="memory", kind="image", result="hit") >= 2
    assert total(traffic, "ray_qzoom_cache_requests_total", backend="memory", kind="image", result="miss") >= 1

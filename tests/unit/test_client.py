"""qzoom-client against an in-process gRPC server with scripted answers: conversions, retries (gRPC's own,
from the service config), message limits, auth metadata, the image-or-id rule, the CLI's commands and
JSON, and coordinates identical to the server's."""

from __future__ import annotations

import json
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import qzoom_client
from qzoom_client import QZoomClient, QZoomClientError, coords
from qzoom_client.client import MAX_IMAGE_BYTES
from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc
from qzoom_client.cli import main as client_main

from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as processor_resize

ID = "ab" * 32


class Scripted(pb_grpc.QZoomServiceServicer):
    """Fails the first `failures` calls with `code`, then answers; records what it received."""

    def __init__(self):
        self.failures, self.code, self.calls, self.metadata, self.requests = 0, grpc.StatusCode.UNAVAILABLE, 0, [], []
        self.lock = threading.Lock()

    def _gate(self, request, context):
        with self.lock:
            self.calls += 1
            self.metadata.append(dict(context.invocation_metadata()))
            self.requests.append(request)
            if self.calls <= self.failures:
                context.abort(self.code, f"scripted failure {self.calls}")

    def Answer(self, request, context):
        self._gate(request, context)
        box = pb.BoxSet(original=pb.Box(x1=10, y1=20, x2=110, y2=220), norm1000=pb.Box(x1=25, y1=50, x2=275, y2=550))
        return pb.AnswerResponse(answer="red", route=pb.ROUTE_ZOOM, gate_score=0.75, roi_box=box,
                                 roi_map=pb.RoiMap(rows=2, cols=3, values=[0, 0.25, 0.5, 0.75, 1, 0]),
                                 visual_tokens=pb.VisualTokens(coarse=6, zoom=4), timings_ms={"total": 5.0},
                                 cache_hit=True, image_id=ID, generated_ids=[1, 2], roi_source="sd_rpn")

    def ZoomRegion(self, request, context):
        self._gate(request, context)
        box = pb.Box(x1=1, y1=2, x2=3, y2=4)
        return pb.ZoomRegionResponse(crop_png=self.crop_png, box=pb.BoxSet(original=box, input=box, norm1000=box,
                                                                          norm1=box),
                                     crop_id="crop-1", crop_width=2, crop_height=2, image_id=ID)

    def UploadImage(self, request, context):
        self._gate(request, context)
        return pb.UploadImageResponse(image_id=ID, width=len(request.image), height=1, input_width=28,
                                      input_height=28, already_stored=False)

    def Health(self, request, context):
        self._gate(request, context)
        return pb.HealthResponse(model_loaded=True, cache_reachable=True, model_id="tiny", version="9.9",
                                 cache_backend="memory")

    crop_png = b"\x89PNG"


@pytest.fixture()
def server():
    servicer, standard = Scripted(), health.HealthServicer()  # grpcio-health-checking's own implementation
    standard.set("qzoom.v1.QZoomService", health_pb2.HealthCheckResponse.SERVING)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                      options=[("grpc.max_receive_message_length", 2 * MAX_IMAGE_BYTES),
                               ("grpc.max_send_message_length", 2 * MAX_IMAGE_BYTES)])
    pb_grpc.add_QZoomServiceServicer_to_server(servicer, srv)
    health_pb2_grpc.add_HealthServicer_to_server(standard, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    servicer.standard = standard
    yield servicer, f"127.0.0.1:{port}"
    srv.stop(0)


def test_answer_result_converts_every_field(server):
    servicer, addr = server
    with QZoomClient(addr, api_key="k1") as qz:
        result = qz.answer(b"png-bytes", "What colour?", mode="zoom", roi_threshold=0.3)
    assert result.to_json() == {
        "answer": "red", "route": "zoom", "gate_score": 0.75, "roi_box": [10, 20, 110, 220],
        "roi_box_norm1000": [25, 50, 275, 550], "roi_map": [[0, 0.25, 0.5], [0.75, 1, 0]], "roi_source": "sd_rpn",
        "visual_tokens": {"coarse": 6, "zoom": 4}, "generated_ids": [1, 2], "timings_ms": {"total": 5.0},
        "image_id": ID, "cache_hit": True}
    sent = servicer.requests[0]
    assert sent.image == b"png-bytes" and sent.options.mode == pb.MODE_ZOOM
    assert sent.options.HasField("roi_threshold") and not sent.options.HasField("gate_threshold")
    assert servicer.metadata[0]["authorization"] == "Bearer k1"


def test_unavailable_is_retried_and_other_errors_are_not(server):
    servicer, addr = server
    servicer.failures = 2
    with QZoomClient(addr, retries=3, backoff_s=0.01) as qz:
        assert qz.answer(ID, "q").answer == "red"
    assert servicer.calls == 3 and servicer.requests[0].image_id == ID
    servicer.calls, servicer.failures, servicer.code = 0, 5, grpc.StatusCode.INVALID_ARGUMENT
    with QZoomClient(addr, retries=3, backoff_s=0.01) as qz, pytest.raises(QZoomClientError) as err:
        qz.answer(ID, "q")
    assert servicer.calls == 1 and err.value.code == "INVALID_ARGUMENT" and "scripted failure" in err.value.details


def test_retries_stop_at_their_budget_and_zero_means_one_attempt(server):
    servicer, addr = server
    servicer.failures = 99
    with QZoomClient(addr, retries=2, backoff_s=0.01) as qz, pytest.raises(QZoomClientError) as err:
        qz.answer(ID, "q")
    assert servicer.calls == 3 and err.value.code == "UNAVAILABLE"
    servicer.calls = 0
    with QZoomClient(addr, retries=0) as qz, pytest.raises(QZoomClientError):
        qz.answer(ID, "q")
    assert servicer.calls == 1


def test_the_largest_accepted_image_goes_out_and_a_crop_past_grpcs_4_mib_default_comes_back(server):
    servicer, addr = server
    servicer.crop_png = bytes(12 << 20)
    with QZoomClient(addr) as qz:
        assert qz.upload_image(bytes(MAX_IMAGE_BYTES)).width == MAX_IMAGE_BYTES
        assert len(qz.zoom_region(ID, [0, 0, 1, 1]).crop_png) == 12 << 20


def test_the_package_ships_its_type_hints():
    from importlib.resources import files

    assert files(qzoom_client).joinpath("py.typed").is_file()


def test_image_or_id_rule(tmp_path):
    with QZoomClient("127.0.0.1:1") as qz:
        with pytest.raises(QZoomClientError, match="neither an image file nor an image id"):
            qz.answer("not-a-file.png", "q")
        with pytest.raises(QZoomClientError, match="not an image id"):
            qz.upload_image(ID)


def test_cli_prints_the_documented_json(server, tmp_path, capsys):
    servicer, addr = server
    image = tmp_path / "img.png"
    image.write_bytes(b"fake")
    assert client_main(["ask", "--addr", addr, "--image", str(image), "--question", "q", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"answer", "route", "gate_score", "roi_box", "roi_map", "visual_tokens", "generated_ids", "timings_ms",
            "image_id", "cache_hit"} <= set(out)
    crop = tmp_path / "crop.png"
    assert client_main(["zoom", "--addr", addr, "--image", ID, "--box", "0,0,0.5,0.5", "--space", "norm1",
                        "--out", str(crop), "--json"]) == 0
    z = json.loads(capsys.readouterr().out)
    assert crop.read_bytes() == b"\x89PNG" and set(z["box"]) == {"original", "input", "norm1000", "norm1"}
    assert servicer.requests[-1].space == pb.COORD_SPACE_NORM1
    servicer.failures, servicer.code = 99, grpc.StatusCode.NOT_FOUND
    assert client_main(["ask", "--addr", addr, "--image", ID, "--question", "q"]) == 2
    assert "qzoom ask: NOT_FOUND" in capsys.readouterr().err
    assert client_main(["zoom", "--addr", addr, "--image", ID, "--box", "0,0,1,1", "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == "NOT_FOUND" and "scripted failure" in error["details"]
    assert client_main(["zoom", "--addr", addr, "--image", ID, "--box", "0,0,one", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "INVALID_ARGUMENT"


def test_cli_upload_health_and_version(server, tmp_path, capsys):
    servicer, addr = server
    image = tmp_path / "img.png"
    image.write_bytes(b"12345")
    assert client_main(["upload", "--addr", addr, "--image", str(image)]) == 0
    assert capsys.readouterr().out.strip() == ID and servicer.requests[-1].image == b"12345"
    assert client_main(["upload", "--addr", addr, "--image", str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["width"] == 5
    assert client_main(["health", "--addr", addr, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "SERVING", "model_loaded": True, "cache_reachable": True,
                                                   "model_id": "tiny", "version": "9.9", "cache_backend": "memory"}
    servicer.standard.set("qzoom.v1.QZoomService", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert client_main(["health", "--addr", addr]) == 1
    assert capsys.readouterr().out.strip() == "NOT_SERVING"
    assert client_main(["health", "--addr", "127.0.0.1:1", "--timeout", "2", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    with pytest.raises(SystemExit) as done:
        client_main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"qzoom-client {qzoom_client.__version__}"


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8000), st.integers(1, 8000), st.integers(4, 2000), st.integers(0, 3000),
       st.sampled_from(coords.SPACES))
def test_client_coordinates_equal_the_image_processors(width, height, lo, extra, space):
    budget = (lo * 784, (lo + extra) * 784)
    assume(max(width, height) / min(width, height) < 150)  # the processor refuses elongated images
    # The server pre-resizes (qwen-vl-utils' rounding, which keeps a side of at least 28 px), then the image
    # processor resizes to the budget with transformers' own function.
    pre = coords.smart_resize(height, width, *coords.preresize_bounds())
    expected = processor_resize(*pre, factor=28, min_pixels=budget[0], max_pixels=budget[1])
    assert coords.input_size_for(width, height, *budget) == (expected[1], expected[0])
    size, input_size = (width, height), coords.input_size_for(width, height, *budget)
    box = (0.1 * width, 0.2 * height, 0.7 * width, 0.9 * height)
    assert coords.to_original(coords.from_original(box, space, size, input_size), space, size, input_size) == \
        pytest.approx(list(box))


def test_input_size_follows_the_models_factor():
    assert coords.input_size_for(1000, 700, 256 * 784, 576 * 784, factor=28) == coords.input_size_for(
        1000, 700, 256 * 784, 576 * 784)
    w, h = coords.input_size_for(1000, 700, 256 * 1024, 576 * 1024, factor=32)  # Qwen3-VL: 16 px x 2 merge
    assert w % 32 == 0 and h % 32 == 0 and 256 <= (w // 32) * (h // 32) <= 576

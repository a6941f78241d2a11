"""The documented deployment path works: Ray's own loader builds the application from a Serve config.

The Helm chart's `serveConfigV2` and configs/serve-gpu.yaml are deployed the way KubeRay deploys them,
through the Ray dashboard's REST API (`PUT /api/serve/applications/`), onto the session's cluster
(tests/serving.py), and answer over gRPC. What is changed for a CPU-only test machine: the deployments'
resources (no GPUs, no worker-group pins, a quarter CPU), the model (the tiny checkpoint, not a 7B hub
download; through the chart's own `model.pvc` values where it has them) with CPU device and dtype, and the
application's name and route prefix, so it sits beside the session's `qzoom` application.
"""

from __future__ import annotations

import copy
from pathlib import Path

import grpc
import pytest
import yaml
from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

from qzoom_service.errors import InvalidInput

from ..helpers import make_image, png

pytest.importorskip("ray")
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from qzoom_service.serve.app import build_app  # noqa: E402
from qzoom_service.serve.run import _client, deploy, undeploy, wait_until_deployed, wait_until_healthy  # noqa: E402
from qzoom_service.serve.settings import IMPORT_PATH, SERVICER_FUNCTION  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_rays_loader_accepts_the_builder_and_validates_its_args_with_app_settings():
    app = call_user_app_builder_with_args_if_necessary(build_app, {"max_new_tokens": 9, "cache_ttl_s": 5})
    assert type(app).__name__ == "Application"
    with pytest.raises(InvalidInput, match="unknown qzoom app args: max_new_tokns"):
        call_user_app_builder_with_args_if_necessary(build_app, {"max_new_tokns": 9})


def _chart_serve_config(tiny_checkpoint) -> dict:
    """The RayService's serveConfigV2 as the chart renders it, for the tiny model on CPU."""
    helm = pytest.importorskip("helm_python")
    values = {"model": {"pvc": {"claimName": "weights", "mountPath": str(tiny_checkpoint)}},
              "serve": {"device": "cpu", "dtype": "float32"}}
    with helm.Chart.load(ROOT / "helm" / "qzoom") as chart:
        manifests = chart.render(values, name="demo", namespace="ml")
    docs = [d for path, text in manifests.items() if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
    service = next(d for d in docs if d["kind"] == "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def _gpu_serve_config(tiny_checkpoint) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "serve-gpu.yaml").read_text())
    config["applications"][0]["args"].update(model=str(tiny_checkpoint), device="cpu", dtype="float32")
    return config


def _on_cpu(config: dict, name: str) -> dict:
    """The config's qzoom application, renamed, with CPU resources; the rest exactly as the file has it."""
    ServeDeploySchema.model_validate(config)  # the whole file, top-level options included, as Ray reads it
    assert SERVICER_FUNCTION in config["grpc_options"]["grpc_servicer_functions"]
    (app,) = copy.deepcopy(config["applications"])
    assert app["import_path"] == IMPORT_PATH
    app.update(name=name, route_prefix=f"/{name}")
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0.25, "num_gpus": 0}
    return app


@pytest.mark.parametrize("source", ["chart", "gpu-config"])
def test_the_shipped_serve_config_deploys_through_the_rest_api_and_answers(source, qzoom_service, tiny_checkpoint):
    config = (_chart_serve_config if source == "chart" else _gpu_serve_config)(tiny_checkpoint)
    app = _on_cpu(config, source)
    deploy(qzoom_service.dashboard, {"applications": [app]})
    try:
        wait_until_deployed(qzoom_service.dashboard, [source], timeout_s=300)
        wait_until_healthy(qzoom_service.address, timeout_s=60, application=source)
        stub = pb_grpc.QZoomServiceStub(grpc.insecure_channel(qzoom_service.address))
        request = pb.AnswerRequest(image=png(make_image(320, 240, seed=41)), question="What colour is the box?",
                                   options=pb.AnswerOptions(mode=pb.MODE_ZOOM, roi_threshold=0.5, max_new_tokens=4))
        answer = stub.Answer(request, metadata=[("application", source)], timeout=60)
        assert answer.route == pb.ROUTE_ZOOM and answer.visual_tokens.zoom > 0 and len(answer.generated_ids) > 0
        # Ray applied the file's deployments: section over the builder's defaults.
        details = _client(qzoom_service.dashboard).get_serve_details()["applications"][source]["deployments"]
        for wanted in app["deployments"]:
            got = details[wanted["name"]]["deployment_config"]
            assert got["max_ongoing_requests"] == wanted["max_ongoing_requests"], wanted["name"]
            assert got["autoscaling_config"]["max_replicas"] == wanted["autoscaling_config"]["max_replicas"]
        # The session's own application was kept.
        assert stub.Health(pb.HealthRequest(), metadata=[("application", "qzoom")], timeout=30).model_loaded
    finally:
        undeploy(qzoom_service.dashboard, {source})


def test_a_bad_arg_fails_the_deployment_with_the_settings_message(qzoom_service):
    app = {"name": "typo", "route_prefix": "/typo", "import_path": IMPORT_PATH, "args": {"max_new_tokns": 9},
           "deployments": [{"name": n, "ray_actor_options": {"num_cpus": 0.25}} for n in ("CoarseGate", "Zoom")]}
    deploy(qzoom_service.dashboard, {"applications": [app]})
    try:
        with pytest.raises(Exception, match="unknown qzoom app args: max_new_tokns") as info:
            wait_until_deployed(qzoom_service.dashboard, ["typo"], timeout_s=120)
        assert type(info.value).__name__ == "Unavailable"
    finally:
        undeploy(qzoom_service.dashboard, {"typo"})

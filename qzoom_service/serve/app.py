"""The Ray Serve application: `build_app(args)` is the `import_path` of the Serve config.

    CoarseGate (gRPC ingress: auth, validation, image handles, coarse pass, gate, SD-RPN, direct answers)
        └── Zoom (RoI re-encode and re-decode; explicit ZoomRegion questions)

Per-deployment resources, replicas and autoscaling come from the Serve config's `deployments:`
section (see configs/serve-gpu.yaml); everything else from `args` (`AppSettings`).
"""

from __future__ import annotations

from ray.serve import Application

from .coarse_deployment import CoarseGate
from .settings import AppSettings
from .zoom_deployment import Zoom

__all__ = ["build_app", "SERVICER_FUNCTION", "HEALTH_SERVICER_FUNCTION", "APP_NAME"]

SERVICER_FUNCTION = "qzoom_client._proto.qzoom.v1.qzoom_pb2_grpc.add_QZoomServiceServicer_to_server"
# grpc.health.v1.Health, what Kubernetes' gRPC probes and grpc_health_probe call (answered by CoarseGate).
HEALTH_SERVICER_FUNCTION = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
APP_NAME = "qzoom"


def build_app(args: dict | None = None, deployment_options: dict[str, dict] | None = None) -> Application:
    """`deployment_options`: optional per-deployment `.options(...)` overrides keyed by deployment name."""
    settings = AppSettings.from_dict(args).to_dict()
    opts = deployment_options or {}
    zoom = Zoom.options(**opts.get("Zoom", {})).bind(settings)
    return CoarseGate.options(**opts.get("CoarseGate", {})).bind(zoom, settings)

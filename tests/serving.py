"""One Ray cluster and one real `qzoom serve` per pytest session, shared by the e2e and integration tests.

The cluster is a `ray start --head --block` subprocess owned by the session (stopped by its process group,
never a machine-wide `ray stop`). `qzoom serve` joins it through `RAY_ADDRESS` and deploys the embedded
default model as application `qzoom` through the dashboard's REST API, as KubeRay does; tests that need
other settings (tests/integration/test_serve_grpc.py, test_deploy_config.py) add applications to the same
Serve config the same way (`qzoom_service.serve.run.deploy`), reached through the same gRPC proxy with the
`application` metadata. Ray therefore starts once per run however many of these tests are selected.

Every Ray process of the session (the head, `qzoom serve`, pytest itself as a driver) shares one token
(Ray's token authentication), set in the environment by `use_session_ray_auth` before anything imports
ray: Ray reads the mode once, on import.
"""

from __future__ import annotations

import os
import secrets
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from qzoom_service.config import EngineConfig
from qzoom_service.serve.settings import GRPC_MESSAGE_LIMIT_ENV, grpc_message_limit

from .helpers import free_port, qzoom_serve, running

__all__ = ["SharedService", "shared_service", "use_session_ray_auth", "REQUEST_TIMEOUT_S", "RAY_CPUS"]

# The proxy's end-to-end limit for every application (a Serve-wide gRPC option): generous for the embedded
# model on a loaded CPU, short enough that a test can queue work past it.
REQUEST_TIMEOUT_S = 20.0
# Logical CPUs of the cluster: scheduling tokens for every deployment of every application, not cores.
RAY_CPUS = 8


def use_session_ray_auth() -> None:
    """Token auth with a token of this session's own, unless the environment already chose."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@dataclass(frozen=True)
class SharedService:
    address: str  # gRPC host:port of the Serve proxy; application "qzoom" is `qzoom serve`'s
    log: Path  # `qzoom serve`'s output
    ray_address: str  # the cluster's GCS address
    metrics_port: int  # Ray's Prometheus exporter on the (only) node
    dashboard: str  # http://host:port of the dashboard, whose REST API deploys applications


@contextmanager
def _ray_head(log: Path, timeout: float = 120):
    """-> (GCS address, metrics port, dashboard URL) of a fresh single-node cluster, stopped afterwards."""
    port, metrics_port, dashboard_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
            f"--num-cpus={RAY_CPUS}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={metrics_port}", f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats"]
    env = {"RAY_metrics_report_interval_ms": "500",  # metrics tests poll the exporter
           # The gRPC proxy's message limit, as `qzoom serve` sets it on a cluster it starts itself.
           GRPC_MESSAGE_LIMIT_ENV: str(grpc_message_limit(EngineConfig()))}
    # The session is over when this stops: a short orderly stop, then the whole process group goes.
    with running(argv, log, "Ray runtime started", timeout=timeout, env=env, stop_wait=5):
        yield f"127.0.0.1:{port}", metrics_port, f"http://127.0.0.1:{dashboard_port}"


@contextmanager
def shared_service(workdir: Path):
    """The session's cluster and `qzoom serve` (embedded default, in-process cache per replica)."""
    config = workdir / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "grpc_options": {"request_timeout_s": REQUEST_TIMEOUT_S},
        "applications": [{
            "name": "qzoom", "route_prefix": "/qzoom", "import_path": "qzoom_service.serve.app:build_app", "args": {},
            "deployments": [{"name": name, "ray_actor_options": {"num_cpus": 0.5}} for name in ("CoarseGate", "Zoom")],
        }],
    }))
    with _ray_head(workdir / "ray.log") as (ray_address, metrics_port, dashboard):
        # The cluster goes down right after: no need to wait long for `qzoom serve` to undeploy in order.
        with qzoom_serve(workdir / "serve.log", "--config", str(config), env={"RAY_ADDRESS": ray_address},
                         stop_wait=5) as addr:
            yield SharedService(addr, workdir / "serve.log", ray_address, metrics_port, dashboard)

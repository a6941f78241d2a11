"""`qzoom serve`: start Ray Serve locally with the qzoom application, wait until it answers, print the address.

Without a config it runs the embedded default on this machine's CPUs (in-process cache per replica).
With `--config` it reads a Ray Serve config (e.g. configs/serve-gpu.yaml): gRPC/HTTP options, the qzoom
application's args and per-deployment resources; flags given explicitly override the file.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import yaml

from ..errors import InvalidInput
from .app import APP_NAME, SERVICER_FUNCTION, build_app

__all__ = ["serve_forever", "start_local", "load_serve_config", "wait_until_healthy"]

log = logging.getLogger("qzoom.serve")

# Fits a 2-core machine: both deployments share one logical CPU.
_LOCAL_DEPLOYMENTS = {"CoarseGate": {"ray_actor_options": {"num_cpus": 0.5}},
                      "Zoom": {"ray_actor_options": {"num_cpus": 0.5}}}
_DEPLOYMENT_KEYS = ("num_replicas", "max_ongoing_requests", "max_queued_requests", "autoscaling_config",
                    "ray_actor_options", "user_config", "health_check_period_s", "health_check_timeout_s",
                    "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s")


def load_serve_config(path: str | Path) -> dict:
    """Read and validate a Ray Serve config with one `qzoom` application (ray.serve.schema)."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    try:
        ServeDeploySchema.model_validate(raw)
    except Exception as e:  # pydantic ValidationError: show it as a config error
        raise InvalidInput(f"{path} is not a valid Ray Serve config: {e}") from None
    apps = [a for a in raw.get("applications", []) if a.get("import_path", "").endswith(":build_app")]
    if len(apps) != 1:
        raise InvalidInput(f"{path}: expected exactly one application with import_path ...serve.app:build_app")
    return raw


def _deployment_options(app: dict) -> dict[str, dict]:
    out = {}
    for d in app.get("deployments", []):
        unknown = set(d) - set(_DEPLOYMENT_KEYS) - {"name"}
        if unknown:
            raise InvalidInput(f"deployment {d.get('name')}: unsupported keys {sorted(unknown)}")
        out[d["name"]] = {k: v for k, v in d.items() if k != "name"}
    return out


def wait_until_healthy(address: str, timeout_s: float = 300.0, application: str | None = None) -> None:
    """Poll the Health RPC until the model is loaded."""
    import grpc

    from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
    from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

    metadata = (("application", application),) if application else None
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.QZoomServiceStub(channel)
        while True:
            try:
                if stub.Health(pb.HealthRequest(), timeout=10, metadata=metadata).model_loaded:
                    return
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{address} not healthy after {timeout_s:.0f} s: {e.code()} {e.details()}")
            time.sleep(0.5)


def serve_forever(*, model=None, redis_url=None, grpc_port=None, http_port=None, host="127.0.0.1",
                  config_path=None) -> None:
    import ray
    from ray import serve

    grpc_options = {"port": 9000, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    http_options = {"host": host, "port": 8000}
    args: dict = {}
    deployments = _LOCAL_DEPLOYMENTS
    if config_path:
        raw = load_serve_config(config_path)
        app = next(a for a in raw["applications"] if a.get("import_path", "").endswith(":build_app"))
        grpc_options.update(raw.get("grpc_options") or {})
        http_options.update(raw.get("http_options") or {})
        args = dict(app.get("args") or {})
        deployments = _deployment_options(app)
    if SERVICER_FUNCTION not in grpc_options["grpc_servicer_functions"]:
        grpc_options["grpc_servicer_functions"].append(SERVICER_FUNCTION)
    if grpc_port is not None:
        grpc_options["port"] = grpc_port
    if http_port is not None:
        http_options["port"] = http_port
    args.update({k: v for k, v in {"model": model, "redis_url": redis_url}.items() if v is not None})
    if not config_path and model is None:
        log.info("no --model: serving the embedded default model on CPU with an in-process cache")

    address = start_local(args, deployments, grpc_options, http_options)
    print(f"qzoom serving gRPC on {address} (application {APP_NAME!r}); Ctrl-C to stop", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def start_local(args: dict, deployments: dict[str, dict], grpc_options: dict | None = None,
                http_options: dict | None = None) -> str:
    """Start Ray (if needed), Serve and the qzoom application in this process; return the gRPC address
    once Health answers. Used by `qzoom serve` and the benchmarks."""
    import ray
    from ray import serve

    grpc_options = {"port": 9000, "grpc_servicer_functions": [SERVICER_FUNCTION], **(grpc_options or {})}
    http_options = {"host": "127.0.0.1", "port": 8000, **(http_options or {})}
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    _check_resources(ray.cluster_resources(), deployments)
    serve.start(http_options=http_options, grpc_options=grpc_options)
    serve.run(build_app(args, deployments), name=APP_NAME, route_prefix=f"/{APP_NAME}", blocking=False)
    host = "127.0.0.1" if http_options["host"] in ("0.0.0.0", "::") else http_options["host"]
    address = f"{host}:{grpc_options['port']}"
    wait_until_healthy(address)
    return address


def _check_resources(cluster: dict, deployments: dict[str, dict]) -> None:
    """Fail fast when a deployment asks for GPUs the local Ray cluster does not have (it would hang)."""
    gpus = cluster.get("GPU", 0)
    for name, opts in deployments.items():
        need = (opts.get("ray_actor_options") or {}).get("num_gpus", 0)
        if need > gpus:
            raise InvalidInput(
                f"deployment {name} needs {need} GPU(s) per replica but this Ray cluster has {gpus}; "
                "run without --config on a CPU machine, or on a GPU node"
            )

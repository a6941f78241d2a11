"""`qzoom serve`: start Ray Serve locally with the qzoom application, wait until it answers, print the address.

Without a config it runs the embedded default on this machine's CPUs (in-process cache per replica).
With `--config` it reads a Ray Serve config (e.g. configs/serve-gpu.yaml): gRPC/HTTP options, the qzoom
application's args and per-deployment resources; flags given explicitly override the file, which
overrides `QZOOM_<FIELD>` engine variables. Everything is validated before Ray starts (`plan_local`): a
typo or a GPU setting on a machine without one fails in a second, not after the cluster is up.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import yaml

from ..config import EngineConfig, nvidia_driver_present
from ..errors import InvalidInput
from .settings import AppSettings

__all__ = ["serve_forever", "start_local", "load_serve_config", "plan_local", "wait_until_healthy"]

log = logging.getLogger("qzoom.serve")

# Fits a 2-core machine: both deployments share one logical CPU.
_LOCAL_DEPLOYMENTS = {"CoarseGate": {"ray_actor_options": {"num_cpus": 0.5}},
                      "Zoom": {"ray_actor_options": {"num_cpus": 0.5}}}
_DEPLOYMENT_KEYS = ("num_replicas", "max_ongoing_requests", "max_queued_requests", "autoscaling_config",
                    "ray_actor_options", "user_config", "health_check_period_s", "health_check_timeout_s",
                    "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s")


def load_serve_config(path: str | Path) -> dict:
    """Read and validate a Ray Serve config with one `qzoom` application: its args first (fast), then
    the whole file against `ray.serve.schema`."""
    raw = _read_yaml(path)
    app = _qzoom_app(raw, path)
    AppSettings.from_dict(app.get("args"))
    _deployment_options(app)
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(raw)
    except Exception as e:  # pydantic ValidationError: show it as a config error
        raise InvalidInput(f"{path} is not a valid Ray Serve config: {e}") from None
    return raw


def _read_yaml(path: str | Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise InvalidInput(f"cannot read the serve config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InvalidInput(f"{path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise InvalidInput(f"{path} must be a YAML mapping (a Ray Serve config)")
    return raw


def _qzoom_app(raw: dict, path) -> dict:
    apps = [a for a in raw.get("applications") or [] if str(a.get("import_path", "")).endswith(":build_app")]
    if len(apps) != 1:
        raise InvalidInput(f"{path}: expected exactly one application with import_path ...serve.app:build_app")
    return apps[0]


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


def plan_local(*, model=None, redis_url=None, grpc_port=None, http_port=None, host="127.0.0.1",
               config_path=None, environ=os.environ) -> tuple[dict, dict[str, dict], dict, dict]:
    """(app args, deployment options, gRPC options, HTTP options) for `start_local`, all validated without
    starting Ray: unknown or bad settings and GPUs this machine lacks raise `InvalidInput`."""
    grpc_options: dict = {"port": 9000, "enable_reflection": True}  # local: grpcurl works; the chart turns it off
    http_options = {"host": host, "port": 8000}
    args: dict = {}
    deployments = _LOCAL_DEPLOYMENTS
    if config_path:
        raw = _read_yaml(config_path)
        app = _qzoom_app(raw, config_path)
        grpc_options.update(raw.get("grpc_options") or {})
        http_options.update(raw.get("http_options") or {})
        args = dict(app.get("args") or {})
        deployments = _deployment_options(app)
    if grpc_port is not None:
        grpc_options["port"] = grpc_port
    if http_port is not None:
        http_options["port"] = http_port
    engine = args.get("engine") or {}
    if isinstance(engine, dict):  # QZOOM_<FIELD> variables sit under the file's settings
        args["engine"] = {**EngineConfig.env_values(environ), **engine}
    args.update({k: v for k, v in {"model": model, "redis_url": redis_url}.items() if v is not None})
    settings = AppSettings.from_dict(args)
    if not environ.get("RAY_ADDRESS"):  # a local cluster: this machine's devices are the cluster's
        settings.engine.check_device()
        if not nvidia_driver_present():
            _check_resources({"GPU": 0}, deployments, where="this machine (no NVIDIA driver)")
    if config_path:
        load_serve_config(config_path)  # the full Ray Serve schema, now that the fast checks passed
    return settings.to_dict(), deployments, grpc_options, http_options


def serve_forever(*, model=None, redis_url=None, grpc_port=None, http_port=None, host="127.0.0.1",
                  config_path=None) -> None:
    args, deployments, grpc_options, http_options = plan_local(
        model=model, redis_url=redis_url, grpc_port=grpc_port, http_port=http_port, host=host,
        config_path=config_path)
    if not config_path and model is None:
        log.info("no --model: serving the embedded default model on CPU with an in-process cache")
    import ray
    from ray import serve

    from .app import APP_NAME

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

    from .app import APP_NAME, HEALTH_SERVICER_FUNCTION, SERVICER_FUNCTION, build_app

    grpc_options = {"port": 9000, "grpc_servicer_functions": [SERVICER_FUNCTION], **(grpc_options or {})}
    for function in (SERVICER_FUNCTION, HEALTH_SERVICER_FUNCTION):
        if function not in grpc_options["grpc_servicer_functions"]:
            grpc_options["grpc_servicer_functions"] = [*grpc_options["grpc_servicer_functions"], function]
    http_options = {"host": "127.0.0.1", "port": 8000, **(http_options or {})}
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True)
    _check_resources(ray.cluster_resources(), deployments)
    serve.start(http_options=http_options, grpc_options=grpc_options)
    serve.run(build_app(args, deployments), name=APP_NAME, route_prefix=f"/{APP_NAME}", blocking=False)
    host = "127.0.0.1" if http_options["host"] in ("0.0.0.0", "::") else http_options["host"]
    address = f"{host}:{grpc_options['port']}"
    wait_until_healthy(address)
    return address


def _check_resources(cluster: dict, deployments: dict[str, dict], where: str = "this Ray cluster") -> None:
    """Fail fast when a deployment asks for GPUs the (local) cluster does not have (it would hang)."""
    gpus = cluster.get("GPU", 0)
    for name, opts in deployments.items():
        need = (opts.get("ray_actor_options") or {}).get("num_gpus", 0)
        if need > gpus:
            raise InvalidInput(
                f"deployment {name} needs {need} GPU(s) per replica but {where} has {gpus}; "
                "run without --config on a CPU machine, or on a GPU node"
            )

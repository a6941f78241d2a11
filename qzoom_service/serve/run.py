"""`qzoom serve`: deploy the qzoom application the way KubeRay does, on a local Ray, and print where it listens.

Without a config it runs the embedded default on this machine's CPUs (in-process cache per replica).
With `--config` it reads a Ray Serve config (e.g. configs/serve-gpu.yaml): gRPC/HTTP options, the qzoom
application's args and per-deployment resources; flags given explicitly override the file, which
overrides `QZOOM_<FIELD>` engine variables. Everything is validated before Ray starts (`plan_local`): a
typo, a missing model, a taken port or a GPU setting on a machine without one fails in a second.

The application is deployed declaratively, through the Ray dashboard's REST API (`PUT
/api/serve/applications/`, what `serve deploy` and KubeRay call), so Ray's own loader builds it from
`import_path` and `args`. Other applications on the same Serve instance are kept (`deploy`).

What binds where: the HTTP proxy and the dashboard bind `--host`; Ray Serve's gRPC proxy has no host
option in Ray 2.60 and binds `[::]:<grpc port>`, every interface, whatever `--host` says.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import EngineConfig, nvidia_driver_present
from ..errors import InvalidInput, Unavailable
from .settings import (APP_NAME, GRPC_MESSAGE_LIMIT_ENV, HEALTH_SERVICER_FUNCTION, IMPORT_PATH, SERVICER_FUNCTION,
                       AppSettings, grpc_message_limit)

__all__ = ["ServePlan", "serve_forever", "start_local", "load_serve_config", "plan_local", "wait_until_healthy",
           "deploy", "undeploy", "wait_until_deployed", "proxy_message_limit"]

log = logging.getLogger("qzoom.serve")

# Fits a 2-core machine: both deployments share one logical CPU. Backpressure by default: past the queue a
# call answers RESOURCE_EXHAUSTED at once instead of waiting for the request timeout.
_LOCAL_DEPLOYMENTS = [{"name": "CoarseGate", "ray_actor_options": {"num_cpus": 0.5},
                       "max_ongoing_requests": 8, "max_queued_requests": 16},
                      {"name": "Zoom", "ray_actor_options": {"num_cpus": 0.5},
                       "max_ongoing_requests": 4, "max_queued_requests": 8}]
_LOCAL_REQUEST_TIMEOUT_S = 60.0  # past this a call answers DEADLINE_EXCEEDED
_DEPLOYMENT_KEYS = ("num_replicas", "max_ongoing_requests", "max_queued_requests", "autoscaling_config",
                    "ray_actor_options", "user_config", "health_check_period_s", "health_check_timeout_s",
                    "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s")
DEFAULT_HOST = "127.0.0.1"  # a laptop; the container image sets QZOOM_SERVE_HOST=0.0.0.0
DEFAULT_DASHBOARD_PORT = 8265  # Ray's, so `serve status` finds it without --address


@dataclass(frozen=True)
class ServePlan:
    """What `qzoom serve` deploys, validated: one Ray Serve config and the local ports around it."""

    config: dict  # a Ray Serve config (ServeDeploySchema) with the qzoom application
    dashboard_port: int
    metrics_port: int | None  # None: a free one is picked when Ray starts
    ray_address: str | None  # join this cluster instead of starting one

    @property
    def app(self) -> dict:
        return _qzoom_app(self.config, "the serve config")

    @property
    def args(self) -> dict:
        return self.app["args"]

    @property
    def host(self) -> str:
        return self.config["http_options"]["host"]


def load_serve_config(path: str | Path) -> dict:
    """Read and validate a Ray Serve config with one `qzoom` application: its args first (fast), then
    the whole file against `ray.serve.schema`."""
    raw = _read_yaml(path)
    app = _qzoom_app(raw, path)
    AppSettings.from_dict(app.get("args"))
    _check_deployments(app)
    _check_schema(raw, path)
    return raw


def _check_schema(config: dict, where) -> None:
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except Exception as e:  # pydantic ValidationError: show it as a config error, on one line
        raise InvalidInput(f"{where} is not a valid Ray Serve config: {e}".replace("\n", " ")) from None


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


def _check_deployments(app: dict) -> None:
    for d in app.get("deployments", []):
        unknown = set(d) - set(_DEPLOYMENT_KEYS) - {"name"}
        if unknown:
            raise InvalidInput(f"deployment {d.get('name')}: unsupported keys {sorted(unknown)}")


def plan_local(*, model=None, redis_url=None, grpc_port=None, http_port=None, host=None, config_path=None,
               device=None, dtype=None, api_keys=(), api_key_file=None, metrics_port=None, dashboard_port=None,
               offline=False, environ=os.environ) -> ServePlan:
    """The validated `ServePlan` for these flags, without starting Ray: unknown or bad settings, a model
    that is not there, ports that are taken and GPUs this machine lacks raise `InvalidInput`."""
    raw = _read_yaml(config_path) if config_path else {"applications": [{
        "name": APP_NAME, "route_prefix": f"/{APP_NAME}", "import_path": IMPORT_PATH, "args": {},
        "deployments": _LOCAL_DEPLOYMENTS}]}
    where = config_path or "the default serve config"
    app = dict(_qzoom_app(raw, where))
    _check_deployments(app)
    settings = AppSettings.from_dict(_merged_args(app.get("args") or {}, environ, model=model, redis_url=redis_url,
                                                  device=device, dtype=dtype))
    app["args"] = settings.to_dict()
    env_vars = dict((app.get("runtime_env") or {}).get("env_vars") or {})
    keys = _api_keys(api_keys, api_key_file)
    if keys:
        env_vars[settings.api_keys_env] = ",".join(keys)
    offline = offline or environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        env_vars["HF_HUB_OFFLINE"] = "1"  # the replicas load the model: no hub retries there either
    if env_vars:
        app["runtime_env"] = {**(app.get("runtime_env") or {}), "env_vars": env_vars}
    original = _qzoom_app(raw, where)
    http = {"port": 8000, **(raw.get("http_options") or {})}
    http["host"] = host or http.get("host") or environ.get("QZOOM_SERVE_HOST") or DEFAULT_HOST
    config = {**raw, "applications": [app if a is original else a for a in raw["applications"]],
              "http_options": http, "grpc_options": _with_servicer(raw.get("grpc_options"))}
    if not config_path:  # local: grpcurl works; a config file (the chart's: off) decides for itself
        config["grpc_options"].setdefault("enable_reflection", True)
        config["grpc_options"].setdefault("request_timeout_s", _LOCAL_REQUEST_TIMEOUT_S)
    if grpc_port is not None:
        config["grpc_options"]["port"] = grpc_port
    if http_port is not None:
        http["port"] = http_port
    plan = ServePlan(config, dashboard_port if dashboard_port is not None else DEFAULT_DASHBOARD_PORT, metrics_port,
                     environ.get("RAY_ADDRESS") or None)
    if plan.ray_address is None:  # a local cluster: this machine's devices, files and ports are the cluster's
        _check_device(settings.engine)
        if not nvidia_driver_present():
            _check_resources({"GPU": 0}, app.get("deployments", []), where="this machine (no NVIDIA driver)")
        _check_model(settings.engine.model, offline)
        _check_ports_free(plan)
    _check_schema(config, where)  # the full Ray Serve schema, now that the fast checks passed
    return plan


def _with_servicer(grpc_options: dict | None) -> dict:
    grpc = {"port": 9000, **(grpc_options or {})}
    grpc["grpc_servicer_functions"] = list(dict.fromkeys([*grpc.get("grpc_servicer_functions", []),
                                                         SERVICER_FUNCTION, HEALTH_SERVICER_FUNCTION]))
    return grpc


def _merged_args(args: dict, environ, **flags) -> dict:
    """The file's args over `QZOOM_<FIELD>` variables, under the flags given."""
    args = dict(args)
    engine = args.get("engine") or {}
    if isinstance(engine, dict):
        args["engine"] = {**EngineConfig.env_values(environ), **engine}
    args.update({k: v for k, v in flags.items() if v is not None})
    return args


def _api_keys(keys, key_file) -> list[str]:
    """`--api-key` values plus the keys in `--api-key-file` (comma- or line-separated)."""
    out = [k.strip() for k in keys if k.strip()]
    if key_file:
        try:
            text = Path(key_file).read_text()
        except OSError as e:
            raise InvalidInput(f"cannot read --api-key-file {key_file}: {e.strerror}") from None
        from_file = [k.strip() for k in text.replace("\n", ",").split(",") if k.strip()]
        if not from_file:
            raise InvalidInput(f"--api-key-file {key_file} holds no keys")
        out += from_file
    if any("," in k for k in out):
        raise InvalidInput("an API key may not contain a comma")
    return out


def _check_device(engine: EngineConfig) -> None:
    engine.check_device()
    if engine.device.startswith("cuda") and not _torch_built_with_cuda():
        raise InvalidInput(f"device={engine.device!r} needs a CUDA build of torch and this one is CPU-only; "
                           "allowed here: cpu")


def _torch_built_with_cuda() -> bool:
    """Read torch/version.py instead of importing torch (seconds): its `cuda` is None in CPU-only builds."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version.read_text()
    except OSError:
        return True  # an unusual install: leave the verdict to torch in the replica
    return not any(line.replace(" ", "").startswith(("cuda:Optional[str]=None", "cuda=None"))
                   for line in text.splitlines())


def _check_model(model: str | None, offline: bool) -> None:
    """A local directory must exist; anything else must be a hub id, cached here when offline."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidInput(f"model {model}: the directory has no config.json (not a Hugging Face checkpoint)")
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise InvalidInput(f"model {model}: no such directory, and not a Hugging Face hub id "
                           "(namespace/name)") from None
    if path.exists() or model.startswith((".", "/", "~")):
        raise InvalidInput(f"model {model}: no such directory")
    if offline and not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise InvalidInput(f"model {model} is not in the local Hugging Face cache and offline mode "
                           "(--offline or HF_HUB_OFFLINE=1) forbids downloading it")


def _check_ports_free(plan: ServePlan) -> None:
    """Bind each port Ray is about to listen on: a taken one would otherwise be shared silently
    (Serve's proxies set SO_REUSEPORT) or fail deep inside Ray."""
    ports = [("gRPC", "0.0.0.0", plan.config["grpc_options"]["port"]),  # Serve binds gRPC on every interface
             ("HTTP", plan.host, plan.config["http_options"]["port"]),
             ("dashboard", plan.host, plan.dashboard_port)]
    if plan.metrics_port:
        ports.append(("metrics", "0.0.0.0", plan.metrics_port))
    for what, host, port in ports:
        if not _port_free(host, port):
            raise InvalidInput(f"port {port} is in use ({what}); stop what listens there or pick another port")


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not "in use"
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# -- the declarative deployment (Ray dashboard REST API) -----------------------------------------------


def _client(dashboard: str):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard if "://" in dashboard else f"http://{dashboard}")


def deploy(dashboard: str, config: dict) -> None:
    """PUT `config` to the dashboard, keeping the applications already deployed that it does not name.

    `PUT /api/serve/applications/` replaces the whole Serve config, so the running one is read back
    first; top-level options absent from `config` stay as they run."""
    _put(dashboard, config, drop={a["name"] for a in config["applications"]})


def undeploy(dashboard: str, names: set[str]) -> None:
    """Remove these applications, keeping the others (declaratively, as `deploy`)."""
    _put(dashboard, {"applications": []}, drop=names)


def _put(dashboard: str, config: dict, drop: set[str]) -> None:
    """The running Serve config without the applications named in `drop`, with `config` on top, PUT back."""
    client = _client(dashboard)
    running = client.get_serve_details()
    kept = [a["deployed_app_config"] for name, a in (running.get("applications") or {}).items()
            if name not in drop and a.get("deployed_app_config")]
    options = {k: running[k] for k in ("proxy_location", "http_options", "grpc_options") if running.get(k)}
    client.deploy_applications({**options, **config, "applications": [*kept, *config["applications"]]})


def wait_until_deployed(dashboard: str, names, timeout_s: float = 300.0) -> None:
    """Poll the applications' status until all run; `Unavailable` with Ray's reason when one fails."""
    client = _client(dashboard)
    deadline = time.monotonic() + timeout_s
    while True:
        apps = client.get_serve_details().get("applications") or {}
        status = {name: (apps.get(name) or {}).get("status") for name in names}
        failed = [name for name, s in status.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            reason = (apps[failed[0]].get("message") or "").strip().splitlines() or ["no reason given"]
            raise Unavailable(f"application {failed[0]} failed to deploy: {reason[-1]}")
        if all(s == "RUNNING" for s in status.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s:.0f} s: {status}")
        time.sleep(1)


# -- qzoom serve ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Running:
    address: str  # gRPC host:port for clients
    dashboard: str  # http://host:port
    metrics_port: int


def serve_forever(plan: ServePlan) -> None:
    """Start (or join) Ray, deploy, print where everything listens, serve until SIGINT/SIGTERM."""
    if plan.args["engine"]["model"] is None:
        log.info("no --model: serving the embedded default model on CPU with an in-process cache")
    import ray

    stop = threading.Event()
    running = None
    try:
        running = _start(plan)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        grpc_port = plan.config["grpc_options"]["port"]
        http = plan.config["http_options"]
        print(f"  gRPC proxy: [::]:{grpc_port}, every interface (Ray Serve's gRPC proxy has no host option)\n"
              f"  HTTP proxy: {http['host']}:{http['port']}\n"
              f"  dashboard:  {running.dashboard} (serve status --address {running.dashboard})\n"
              f"  metrics:    http://{_client_host(http['host'])}:{running.metrics_port}/metrics", flush=True)
        print(f"qzoom serving gRPC on {running.address} (application {APP_NAME!r}); Ctrl-C to stop", flush=True)
        stop.wait()
    finally:
        if plan.ray_address and running is not None:  # a shared cluster: leave its other applications be
            undeploy(running.dashboard, {plan.app["name"]})
        ray.shutdown()


def _start(plan: ServePlan) -> _Running:
    import ray

    if plan.ray_address:
        context = ray.init(address=plan.ray_address, log_to_driver=False)
    else:
        # Without SO_REUSEPORT a port taken after our check fails loudly instead of halving its traffic.
        os.environ.setdefault("SERVE_SOCKET_REUSE_PORT_ENABLED", "0")
        # The proxy (a process of this new cluster) inherits it; a joined cluster needs it set on its nodes.
        os.environ.setdefault(GRPC_MESSAGE_LIMIT_ENV, str(proxy_message_limit(plan)))
        context = ray.init(include_dashboard=True, dashboard_host=plan.host, dashboard_port=plan.dashboard_port,
                           _metrics_export_port=plan.metrics_port or _free_port(), log_to_driver=True)
    _check_resources(ray.cluster_resources(), plan.app.get("deployments", []))
    dashboard = f"http://{context.dashboard_url}"
    deploy(dashboard, plan.config)
    name = plan.app["name"]
    wait_until_deployed(dashboard, [name])
    address = f"{_client_host(plan.host)}:{plan.config['grpc_options']['port']}"
    wait_until_healthy(address, application=name)
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return _Running(address, dashboard, node["MetricsExportPort"])


def proxy_message_limit(plan: ServePlan) -> int:
    """The gRPC proxy's message limit for this plan's qzoom application (`grpc_message_limit`)."""
    return grpc_message_limit(AppSettings.from_dict(plan.args).engine)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def start_local(args: dict, deployments: dict[str, dict], grpc_options: dict | None = None,
                http_options: dict | None = None) -> str:
    """Start a local Ray with the qzoom application (deployed declaratively) in this process; return the gRPC
    address once Health answers. Used by the benchmarks."""
    config = {"http_options": {"host": DEFAULT_HOST, "port": 8000, **(http_options or {})},
              "grpc_options": _with_servicer(grpc_options),
              "applications": [{"name": APP_NAME, "route_prefix": f"/{APP_NAME}", "import_path": IMPORT_PATH,
                                "args": AppSettings.from_dict(args).to_dict(),
                                "deployments": [{"name": n, **o} for n, o in deployments.items()]}]}
    return _start(ServePlan(config, _free_port(), None, os.environ.get("RAY_ADDRESS") or None)).address


def _check_resources(cluster: dict, deployments: list[dict], where: str = "this Ray cluster") -> None:
    """Fail fast when a deployment asks for GPUs the (local) cluster does not have (it would hang)."""
    gpus = cluster.get("GPU", 0)
    for d in deployments:
        need = (d.get("ray_actor_options") or {}).get("num_gpus", 0)
        if need > gpus:
            raise InvalidInput(
                f"deployment {d.get('name')} needs {need} GPU(s) per replica but {where} has {gpus}; "
                "run without --config on a CPU machine, or on a GPU node"
            )

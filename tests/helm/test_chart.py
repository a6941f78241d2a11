"""The Helm chart (helm/qzoom), rendered by the real Helm engine (helm-python-sdk: Helm's Go SDK behind
a C ABI, no helm binary), makes objects a cluster would accept and a Serve config Ray would accept.

What this cannot show without a cluster: that KubeRay reconciles the RayService, that pods schedule
on GPU nodes, that the serve Service gets its endpoints, that the image builds.
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import re
import urllib.parse
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
    gRPCOptionsSchema,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "qzoom"
SERVE_CONFIG = ROOT / "configs" / "serve-gpu.yaml"
CRD_SCHEMA = CHART / "ci" / "rayservice-crd-schema.json"
CI_FILES = ("gpu-production.yaml", "external-redis.yaml", "auth-on.yaml")
CASES = ("default",) + CI_FILES
K8S_VERSION = "1.36.0"  # the Kubernetes version Helm's SDK assumes when rendering offline
RELEASE, NAMESPACE = "demo", "ml"
SERVICER = "qzoom_client._proto.qzoom.v1.qzoom_pb2_grpc.add_QZoomServiceServicer_to_server"
APP_IMPORT = "qzoom_service.serve.app:build_app"


# ---------------------------------------------------------------------------------------------
# Rendering


def _ci_values(case: str) -> dict:
    return {} if case == "default" else yaml.safe_load((CHART / "ci" / case).read_text())


def _render(values: dict) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)


def _objects(manifests: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@functools.lru_cache(maxsize=None)
def _rendered(case: str) -> tuple[dict[str, str], tuple]:
    manifests = _render(_ci_values(case))
    return manifests, tuple(_objects(manifests))


def objects(case: str) -> list[dict]:
    # Deep copies, so a test that pokes at an object cannot change what the next test sees.
    return json.loads(json.dumps(list(_rendered(case)[1])))


def notes(case: str) -> str:
    return next(text for path, text in _rendered(case)[0].items() if path.endswith("NOTES.txt"))


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def rayservice(case: str) -> dict:
    return one(objects(case), "RayService")


def serve_config(case: str) -> dict:
    return yaml.safe_load(rayservice(case)["spec"]["serveConfigV2"])


def pod_templates(case: str) -> dict[str, dict]:
    """Every pod template the release creates, by group: head, each worker group, redis."""
    spec = rayservice(case)["spec"]["rayClusterConfig"]
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    pods.update({o["metadata"]["name"]: o["spec"]["template"] for o in objects(case) if o["kind"] == "Deployment"})
    return pods


def worker_group(case: str, name: str) -> dict:
    groups = rayservice(case)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return next(g for g in groups if g["groupName"] == name)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_data(case: str, name: str) -> dict[str, str]:
    secret = one(objects(case), "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def render_error(values: dict) -> str:
    with pytest.raises(helm.HelmError) as info:
        _render(values)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Chart layout and values documentation

_KEY = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$")


def documented_values(text: str) -> tuple[dict[str, str], list[str]]:
    """(path -> description of each key documented with `# --`, paths of keys lacking one).

    A documented key covers its whole default value; an undocumented mapping is a section whose
    keys must each be documented (helm-docs' rule)."""
    documented, missing = {}, []
    stack: list[tuple[int, str]] = []  # open sections: (indent, key)
    pending: tuple[int, str] | None = None
    covered_below: int | None = None  # indent of a documented key whose value we are inside
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if covered_below is not None and stripped and indent > covered_below:
            continue
        covered_below = None
        if stripped.startswith("# --"):
            pending = (indent, stripped[4:].strip())
            continue
        if not stripped or stripped.startswith("#"):
            continue
        match = _KEY.match(line)
        if not match:
            pending = None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [match.group(2)])
        if pending and pending[0] == indent and pending[1]:
            documented[path] = pending[1]
            covered_below = indent
        elif match.group(3).strip() in ("", "|", ">"):
            stack.append((indent, match.group(2)))
        else:
            missing.append(path)
        pending = None
    return documented, missing


def test_every_values_key_has_a_one_line_description():
    documented, missing = documented_values((CHART / "values.yaml").read_text())
    assert not missing, f"values without a `# --` description line directly above: {missing}"
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves_and_sections(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path
            if isinstance(value, dict) and path not in documented and value:
                yield from leaves_and_sections(value, path + ".")

    undocumented = [p for p in leaves_and_sections(values)
                    if p not in documented and not any(d.startswith(p + ".") for d in documented)]
    assert not undocumented, f"keys neither documented nor sections of documented keys: {undocumented}"
    camel = re.compile(r"^[a-z][A-Za-z0-9]*$")
    not_camel = [p for p in documented if not all(camel.match(part) for part in p.split("."))]
    assert not not_camel, f"values keys must be camelCase: {not_camel}"


def test_chart_readme_lists_every_documented_value():
    documented, _ = documented_values((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    absent = [p for p in documented if f"| {p} |" not in readme]
    assert not absent, f"helm/qzoom/README.md's values table lacks: {absent}"


def test_chart_has_the_standard_helpers_and_metadata():
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    for name in ("qzoom.name", "qzoom.fullname", "qzoom.chart", "qzoom.labels", "qzoom.selectorLabels"):
        assert f'define "{name}"' in helpers, name
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "qzoom"
    assert meta["appVersion"] and meta["kubeVersion"] and meta["description"]
    # One object per template file.
    for case in CASES:
        for path, text in _rendered(case)[0].items():
            if not path.endswith("NOTES.txt"):
                assert len([d for d in yaml.safe_load_all(text) if d]) <= 1, f"{path} renders several objects"


def test_lint_is_clean_in_strict_mode():
    report = helm.lint(CHART, strict=True, kube_version=f"v{K8S_VERSION}")
    assert not report["errors"], report
    worse_than_info = [m for m in report["messages"] if m["severity"] >= 2]
    assert not worse_than_info, worse_than_info


@pytest.mark.parametrize("case", CASES)
def test_values_files_pass_the_values_schema(case):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(_ci_values(case))


def test_values_schema_rejects_unknown_and_mistyped_keys():
    assert "additional properties 'replicaCount' not allowed" in render_error({"replicaCount": 3})
    message = render_error({"workerGroups": {"zoom": {"gpus": "two"}}})
    assert "/workerGroups/zoom/gpus" in message
    message = render_error({"auth": {"enabled": True, "apiKeys": ["short,key"]}})
    assert "/auth/apiKeys/0" in message


# ---------------------------------------------------------------------------------------------
# Objects


def test_default_values_render_the_rayservice_and_the_builtin_redis():
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects("default"))
    assert kinds == [
        ("Deployment", "demo-qzoom-redis"),
        ("NetworkPolicy", "demo-qzoom-redis"),
        ("RayService", "demo-qzoom"),
        ("Secret", "demo-qzoom-redis"),
        ("Service", "demo-qzoom-redis"),
    ]
    for obj in objects("default"):
        assert obj["metadata"]["namespace"] == NAMESPACE
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE and labels["app.kubernetes.io/name"] == "qzoom"
        assert labels["helm.sh/chart"] == "qzoom-0.1.0"


@pytest.mark.parametrize("case", CASES)
def test_the_grpc_port_is_exported_as_serve_grpc(case):
    spec = rayservice(case)["spec"]
    ports = {p["name"]: p for p in spec["serveService"]["spec"]["ports"]}
    assert ports["serve-grpc"]["port"] == 9000 and ports["serve-grpc"]["targetPort"] == "serve-grpc"
    assert ports["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["serve"]["port"] == 8000  # the HTTP proxy stays on: KubeRay's readiness probe uses it
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000,
                          "serve-grpc": 9000, "metrics": 8080}
    for group in spec["rayClusterConfig"]["workerGroupSpecs"]:
        worker_ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert worker_ports["serve-grpc"] == 9000 and worker_ports["serve"] == 8000
    config = serve_config(case)
    assert config["grpc_options"]["port"] == 9000 and config["http_options"]["port"] == 8000


def test_the_head_takes_no_replicas_and_the_zoom_pool_has_gpus():
    cluster = rayservice("default")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["coarse", "zoom"]
    for name in ("coarse", "zoom"):
        group = worker_group("default", name)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1 and group["rayStartParams"]["num-gpus"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            group["template"]["spec"]["tolerations"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    production = worker_group("gpu-production.yaml", "zoom")["template"]["spec"]
    assert production["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


@pytest.mark.parametrize("case", CASES)
def test_each_deployment_is_pinned_to_its_pool_by_a_custom_resource(case):
    config = serve_config(case)
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    for deployment, group in (("CoarseGate", "coarse"), ("Zoom", "zoom")):
        wanted = deployments[deployment]["ray_actor_options"]["resources"]
        advertised = worker_group(case, group)["resources"]
        assert set(wanted) == {f"qzoom-pool-{group}"} and set(advertised) == set(wanted)
        assert 0 < wanted[f"qzoom-pool-{group}"] <= float(advertised[f"qzoom-pool-{group}"])


def test_worker_groups_can_be_disabled_and_unpinned():
    objs = _objects(_render({"workerGroups": {"coarse": {"enabled": False}},
                             "serve": {"deployments": {"coarseGate": {"workerGroup": ""}}}}))
    cluster = one(objs, "RayService")["spec"]
    assert [g["groupName"] for g in cluster["rayClusterConfig"]["workerGroupSpecs"]] == ["zoom"]
    coarse = yaml.safe_load(cluster["serveConfigV2"])["applications"][0]["deployments"][0]
    assert coarse["name"] == "CoarseGate" and "resources" not in coarse["ray_actor_options"]


@pytest.mark.parametrize("case", CASES)
def test_every_container_has_requests_limits_and_a_locked_down_security_context(case):
    for group, template in pod_templates(case).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, group
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, group
        for container in pod["containers"]:
            where = f"{group}/{container['name']}"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), where
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True, where
    autoscaler = rayservice(case)["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert {"cpu", "memory"} <= set(autoscaler["resources"]["limits"])
    assert autoscaler["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("case", CASES)
def test_ray_pods_run_as_uid_1000_with_writable_emptydirs_only_where_ray_writes(case):
    for group, template in pod_templates(case).items():
        if group.endswith("-redis"):
            continue
        pod = template["spec"]
        assert pod["securityContext"]["runAsUser"] == 1000, group
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        for path in ("/tmp", "/tmp/ray", "/dev/shm", "/home/ray/.cache"):
            assert "emptyDir" in volumes[mounts[path]], (group, path)
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert env_of(pod["containers"][0])["HF_HOME"]["value"].startswith("/home/ray/.cache/")


def test_the_builtin_redis_is_a_bounded_cache_whose_password_comes_from_its_secret():
    objs = objects("default")
    deployment = one(objs, "Deployment", "demo-qzoom-redis")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("redis:")
    args = container["args"]
    for flag, value in (("--maxmemory-policy", "allkeys-lru"), ("--save", ""), ("--appendonly", "no"),
                        ("--maxmemory", "3gb"), ("--requirepass", "$(REDIS_PASSWORD)")):
        assert args[args.index(flag) + 1] == value, flag
    ref = env_of(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "demo-qzoom-redis", "key": "redis-password"}
    assert container["resources"]["limits"]["memory"] == "4Gi"
    data = secret_data("default", "demo-qzoom-redis")
    password = data["redis-password"]
    assert len(password) == 32
    # The URL with the password reaches the replicas from the Secret, never through the serve config.
    url = urllib.parse.urlsplit(data["redis-url"])
    assert (url.scheme, url.password, url.hostname, url.port, url.path) == \
        ("redis", password, "demo-qzoom-redis.ml.svc", 6379, "/0")
    args = serve_config("default")["applications"][0]["args"]
    assert args["redis_url_env"] == "QZOOM_REDIS_URL" and "redis_url" not in args
    assert password not in one(objs, "RayService")["spec"]["serveConfigV2"]
    ray_pods = {n: t for n, t in pod_templates("default").items() if n != "demo-qzoom-redis"}
    assert set(ray_pods) >= {"head", "coarse", "zoom"}
    for template in ray_pods.values():
        ref = env_of(template["spec"]["containers"][0])["QZOOM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "demo-qzoom-redis", "key": "redis-url"}
    service = one(objs, "Service", "demo-qzoom-redis")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    policy = one(objs, "NetworkPolicy", "demo-qzoom-redis")
    peers = policy["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert peers["matchExpressions"][0]["values"] == ["ray-head", "ray-worker"]


def test_a_given_redis_password_is_used_verbatim():
    objs = _objects(_render({"redis": {"builtin": {"password": "pa55-word.x"}}}))
    secret = one(objs, "Secret", "demo-qzoom-redis")
    assert base64.b64decode(secret["data"]["redis-password"]).decode() == "pa55-word.x"
    url = base64.b64decode(secret["data"]["redis-url"]).decode()
    assert url == "redis://:pa55-word.x@demo-qzoom-redis.ml.svc:6379/0"
    assert "pa55-word.x" not in one(objs, "RayService")["spec"]["serveConfigV2"]


def test_external_redis_replaces_the_builtin_one():
    objs = objects("external-redis.yaml")
    assert sorted(o["kind"] for o in objs) == ["RayService", "Secret"]
    data = secret_data("external-redis.yaml", "demo-qzoom-redis")
    assert data == {"redis-url": _ci_values("external-redis.yaml")["redis"]["external"]["url"]}


def test_api_keys_reach_every_ray_container_from_the_chart_secret():
    keys = _ci_values("auth-on.yaml")["auth"]["apiKeys"]
    assert secret_data("auth-on.yaml", "demo-qzoom-api-keys") == {"api-keys": ",".join(keys)}
    for group, template in pod_templates("auth-on.yaml").items():
        if group.endswith("-redis"):
            assert "QZOOM_API_KEYS" not in env_of(template["spec"]["containers"][0])
            continue
        ref = env_of(template["spec"]["containers"][0])["QZOOM_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "demo-qzoom-api-keys", "key": "api-keys"}, group
    assert serve_config("auth-on.yaml")["applications"][0]["args"]["api_keys_env"] == "QZOOM_API_KEYS"
    assert "--api-key" in notes("auth-on.yaml")


def test_without_auth_no_key_secret_or_variable_exists():
    assert not [o for o in objects("default") if o["metadata"]["name"].endswith("api-keys")]
    for template in pod_templates("default").values():
        assert "QZOOM_API_KEYS" not in env_of(template["spec"]["containers"][0])
    assert "--api-key" not in notes("default")


def test_production_uses_existing_secrets_and_weights_from_a_pvc():
    values = _ci_values("gpu-production.yaml")
    assert not [o for o in objects("gpu-production.yaml") if o["metadata"]["name"].endswith("api-keys")]
    pods = pod_templates("gpu-production.yaml")
    for group in ("coarse", "zoom"):
        pod = pods[group]["spec"]
        env = env_of(pod["containers"][0])
        assert env["QZOOM_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "qzoom-api-keys", "key": "api-keys"}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        model = next(v for v in pod["volumes"] if v["name"] == "model")
        assert model["persistentVolumeClaim"] == {"claimName": values["model"]["pvc"]["claimName"], "readOnly": True}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model")
        assert mount["mountPath"] == values["model"]["pvc"]["mountPath"] and mount["readOnly"] is True
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert "model" not in {v["name"] for v in pods["head"]["spec"]["volumes"]}
    args = serve_config("gpu-production.yaml")["applications"][0]["args"]
    assert args["model"] == values["model"]["pvc"]["mountPath"]
    image = pods["zoom"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/ml/qzoom-service:0.1.0"


@pytest.mark.parametrize("case", CASES)
def test_notes_say_how_to_reach_the_grpc_port(case):
    text = notes(case)
    assert "port-forward svc/demo-qzoom-serve-svc 9000:serve-grpc" in text
    assert "qzoom-client ask --addr localhost:9000 --image" in text and "--question" in text


# ---------------------------------------------------------------------------------------------
# The Serve config


_SCHEMAS = {
    (): ServeDeploySchema,
    ("http_options",): HTTPOptionsSchema,
    ("grpc_options",): gRPCOptionsSchema,
    ("applications", "*"): ServeApplicationSchema,
    ("applications", "*", "deployments", "*"): DeploymentSchema,
    ("applications", "*", "deployments", "*", "ray_actor_options"): RayActorOptionsSchema,
    ("applications", "*", "deployments", "*", "autoscaling_config"): AutoscalingConfig,
}
# Free-form maps inside a known field: their keys belong to the app or to Ray, not to the schema.
_FREE = {("applications", "*", "args"), ("applications", "*", "deployments", "*", "ray_actor_options", "resources")}


def unknown_keys(node, path=()) -> list[str]:
    """Keys at any level that the Serve schema classes do not define (the schema ignores extras)."""
    if path in _FREE:
        return []
    if isinstance(node, list):
        return [bad for item in node for bad in unknown_keys(item, path + ("*",))]
    if not isinstance(node, dict):
        return []
    model = _SCHEMAS.get(path)
    assert model is not None, f"no schema class mapped for {'.'.join(path)}: extend _SCHEMAS"
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    bad = [".".join(path + (k,)) for k in node if k not in known]
    for key, value in node.items():
        if isinstance(value, (dict, list)) and key in known:
            bad += unknown_keys(value, path + (key,))
    return bad


def test_unknown_key_check_catches_a_misspelled_key():
    assert unknown_keys({"applications": [{"name": "a", "deployments": [{"name": "D", "num_replica": 2}]}]}) == \
        ["applications.*.deployments.*.num_replica"]
    assert unknown_keys({"grpc_options": {"servicer_functions": []}}) == ["grpc_options.servicer_functions"]


def _serve_configs() -> dict[str, dict]:
    configs = {f"chart:{case}": serve_config(case) for case in CASES}
    configs["configs/serve-gpu.yaml"] = yaml.safe_load(SERVE_CONFIG.read_text())
    return configs


@pytest.mark.parametrize("name", [f"chart:{c}" for c in CASES] + ["configs/serve-gpu.yaml"])
def test_serve_config_validates_against_ray_serve_schema_with_no_unknown_keys(name):
    config = _serve_configs()[name]
    ServeDeploySchema.model_validate(config)
    assert unknown_keys(config) == []


@pytest.mark.parametrize("name", [f"chart:{c}" for c in CASES] + ["configs/serve-gpu.yaml"])
def test_rays_loader_builds_the_app_from_the_serve_config_args(name):
    # What the Serve controller does with import_path and args (serve deploy, KubeRay), minus the cluster.
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    app = _serve_configs()[name]["applications"][0]
    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"])
    assert type(built).__name__ == "Application"
    from qzoom_service.serve.app import AppArgs

    settings = AppArgs.model_validate(app["args"]).settings  # the builder's argument, as Ray validates it
    assert settings.api_keys_env == "QZOOM_API_KEYS" and settings.engine.model == app["args"]["model"]


@pytest.mark.parametrize("name", [f"chart:{c}" for c in CASES] + ["configs/serve-gpu.yaml"])
def test_serve_config_names_only_import_paths_that_exist(name):
    config = _serve_configs()[name]
    for path in config["grpc_options"]["grpc_servicer_functions"]:
        module, _, attr = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), path
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]


def test_chart_serve_config_matches_the_project_serve_config():
    chart, project = serve_config("default"), yaml.safe_load(SERVE_CONFIG.read_text())
    assert chart["grpc_options"]["grpc_servicer_functions"] == project["grpc_options"]["grpc_servicer_functions"] \
        == [SERVICER, HEALTH_SERVICER]
    for key in ("port", "request_timeout_s", "enable_reflection"):
        assert chart["grpc_options"][key] == project["grpc_options"][key], key
    assert chart["http_options"] == project["http_options"]
    assert chart["proxy_location"] == project["proxy_location"]

    def shape(config):
        return [(a["name"], a["route_prefix"], a["import_path"], sorted(a["args"]),
                 [d["name"] for d in a["deployments"]]) for a in config["applications"]]

    assert shape(chart) == shape(project)
    assert chart["applications"][0]["import_path"] == APP_IMPORT
    # Resources, limits and autoscaling defaults agree too (the chart only adds the pool pins).
    for mine, theirs in zip(chart["applications"][0]["deployments"], project["applications"][0]["deployments"]):
        mine["ray_actor_options"].pop("resources")
        assert mine == theirs, mine["name"]
    for key, value in project["applications"][0]["args"].items():
        if key != "redis_url":
            assert chart["applications"][0]["args"][key] == value, key


# ---------------------------------------------------------------------------------------------
# Schemas of the objects


def _closed(schema):
    """Copy of a CRD schema that, like the API server's pruning, refuses fields it does not define."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=1)
def _crd_validator():
    schema = _closed(json.loads(CRD_SCHEMA.read_text()))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def crd_errors(obj) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _crd_validator().iter_errors(obj)]


def test_crd_schema_is_the_kuberay_rayservice_schema():
    schema = json.loads(CRD_SCHEMA.read_text())
    assert "ray-project/kuberay" in schema["$comment"] and "v1.7.0" in schema["$comment"]
    assert {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy"} <= set(
        schema["properties"]["spec"]["properties"])


@pytest.mark.parametrize("case", CASES)
def test_rayservice_validates_against_the_kuberay_crd_schema(case):
    obj = rayservice(case)
    assert (obj["apiVersion"], obj["kind"]) == ("ray.io/v1", "RayService")
    assert crd_errors(obj) == []


def test_crd_validation_catches_a_misplaced_field():
    obj = rayservice("default")
    obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["gpus"] = 1
    del obj["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    errors = crd_errors(obj)
    assert any("'gpus' was unexpected" in e for e in errors), errors
    assert any("'template' is a required property" in e for e in errors), errors


def _core_objects(case: str) -> list[tuple[str, dict]]:
    """Built-in kinds the release creates, plus the pod templates and Service embedded in the RayService."""
    out = [(f"{o['kind']}/{o['metadata']['name']}", o) for o in objects(case) if o["kind"] != "RayService"]
    for group, template in pod_templates(case).items():
        out.append((f"PodTemplate/{group}", {"apiVersion": "v1", "kind": "PodTemplate",
                                              "metadata": {"name": group}, "template": template}))
    serve_service = rayservice(case)["spec"]["serveService"]
    out.append(("Service/serveService", {"apiVersion": "v1", "kind": "Service", **serve_service}))
    return out


@pytest.mark.parametrize("case", CASES)
def test_core_objects_validate_strictly_against_kubernetes_schemas(case):
    failures = []
    for name, obj in _core_objects(case):
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
    assert not failures, "\n".join(failures)


def test_kubernetes_validation_catches_a_misspelled_field():
    _, deployment = next((n, o) for n, o in _core_objects("default") if n.startswith("Deployment/"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------
# Bad values fail rendering with a message that names the keys to change


@pytest.mark.parametrize(("values", "message"), [
    ({"workerGroups": {"zoom": {"gpus": 0}}},
     "workerGroups.zoom: the zoom pool is enabled with 0 GPUs. Set workerGroups.zoom.gpus to at least 1"),
    ({"model": {"id": "", "pvc": {"claimName": ""}}},
     "model: no model given. Set model.id"),
    ({"redis": {"external": {"enabled": True, "url": "redis://cache:6379/0"}}},
     "redis: both redis.builtin.enabled and redis.external.enabled are true. Enable exactly one"),
    ({"redis": {"builtin": {"enabled": False}}},
     "redis: neither redis.builtin.enabled nor redis.external.enabled is true. Enable exactly one"),
    ({"redis": {"builtin": {"enabled": False}, "external": {"enabled": True}}},
     "redis.external.enabled is true but redis.external.url is empty"),
    ({"auth": {"enabled": True}},
     "auth: auth.enabled is true but there are no keys"),
    ({"workerGroups": {"zoom": {"enabled": False}}},
     'serve.deployments.zoom.workerGroup is "zoom", which is not an enabled worker group'),
    ({"workerGroups": {"coarse": {"gpus": 0}}},
     'serve.deployments.coarseGate: a replica needs 0.5 GPUs but its worker group "coarse" has 0 per pod'),
    ({"workerGroups": {"zoom": {"minReplicas": 3, "replicas": 1}}},
     "workerGroups.zoom: need minReplicas <= replicas <= maxReplicas, got 3 <= 1 <= 8"),
    ({"serve": {"deployments": {"zoom": {"autoscaling": {"minReplicas": 9}}}}},
     "serve.deployments.zoom.autoscaling: minReplicas (9) is larger than maxReplicas (8)"),
    ({"serve": {"extraArgs": {"redis_url": "redis://elsewhere:6379/0"}}},
     "serve.extraArgs.redis_url: the chart sets redis_url from its own values"),
])
def test_bad_values_fail_rendering_with_a_readable_message(values, message):
    error = render_error(values)
    assert message in error, error


def test_extra_args_reach_the_app_and_extra_worker_groups_render():
    group = {"enabled": True, "replicas": 0, "minReplicas": 0, "maxReplicas": 4, "gpus": 1,
             "resources": {"requests": {"cpu": "6", "memory": "48Gi"}, "limits": {"cpu": "6", "memory": "48Gi"}}}
    objs = _objects(_render({"serve": {"extraArgs": {"max_new_tokens": 64}}, "workerGroups": {"zoom-l40s": group}}))
    service = one(objs, "RayService")
    assert crd_errors(service) == []
    groups = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["coarse", "zoom", "zoom-l40s"]
    assert groups[2]["resources"] == {"qzoom-pool-zoom-l40s": "1"}
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    from qzoom_service.serve.settings import AppSettings

    assert AppSettings.from_dict(args).engine.max_new_tokens == 64


def test_a_disabled_zoom_pool_may_have_no_gpus():
    objs = _objects(_render({"workerGroups": {"zoom": {"enabled": False, "gpus": 0}},
                             "serve": {"deployments": {"zoom": {"workerGroup": "coarse"}}}}))
    groups = one(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["coarse"]


# ---------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_dockerfile_runs_as_non_root_and_installs_the_package():
    lines = _dockerfile()
    users = [arg for ins, arg in lines if ins == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert users[-1].split(":")[0] == "1000"
    last_from = max(i for i, (ins, _) in enumerate(lines) if ins == "FROM")
    assert any(ins == "USER" for ins, _ in lines[last_from:])
    runs = " ".join(arg for ins, arg in lines if ins == "RUN")
    assert re.search(r"pip install [^&]*/tmp/qzoom-src", runs), "the package itself is pip-installed"
    assert re.search(r"pip install .*torch==", runs), "torch is installed explicitly"
    copied = " ".join(arg for ins, arg in lines if ins == "COPY")
    assert "pyproject.toml" in copied and "qzoom_service" in copied
    exposed = {int(p) for ins, arg in lines if ins == "EXPOSE" for p in arg.split()}
    assert {8000, 9000, 8265, 6379, 8080} <= exposed
    env = " ".join(arg for ins, arg in lines if ins == "ENV")
    assert "HF_HOME=/home/ray/.cache/huggingface" in env
    assert "QZOOM_SERVE_HOST=0.0.0.0" in env  # `qzoom serve` reachable from outside the container
    args = {arg.split("=")[0]: arg.split("=", 1)[1] for ins, arg in lines if ins == "ARG" and "=" in arg}
    ray_version = yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"]
    assert args["RAY_IMAGE"].startswith(f"rayproject/ray:{ray_version}-"), "image Ray == chart rayVersion"


def test_dockerignore_keeps_the_build_context_to_the_package():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[patterns.index("**") + 1:][:3] == ["!pyproject.toml", "!README.md", "!qzoom_service/"]


# ---------------------------------------------------------------------------------------------
# Health, metrics, disruptions


HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"


@pytest.mark.parametrize("case", CASES)
def test_worker_pods_are_ready_by_grpc_health_through_their_proxy_and_the_head_keeps_kuberays(case):
    pods = pod_templates(case)
    config = serve_config(case)
    assert HEALTH_SERVICER in config["grpc_options"]["grpc_servicer_functions"]
    assert len(config["applications"]) == 1  # a probe sends no `application` metadata: one app, or no route
    for group in (g["groupName"] for g in rayservice(case)["spec"]["rayClusterConfig"]["workerGroupSpecs"]):
        probe = pods[group]["spec"]["containers"][0]["readinessProbe"]
        assert probe["grpc"] == {"port": config["grpc_options"]["port"], "service": "qzoom.v1.QZoomService"}
        assert probe["timeoutSeconds"] >= 1 and "livenessProbe" not in pods[group]["spec"]["containers"][0]
    assert "readinessProbe" not in pods["head"]["spec"]["containers"][0]


def test_the_readiness_probe_can_be_turned_off_and_tuned():
    manifests = _render({"probes": {"readiness": {"enabled": False}}})
    spec = next(o for o in _objects(manifests) if o["kind"] == "RayService")["spec"]["rayClusterConfig"]
    assert all("readinessProbe" not in g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"])
    manifests = _render({"probes": {"readiness": {"periodSeconds": 3, "timeoutSeconds": 2}}})
    spec = next(o for o in _objects(manifests) if o["kind"] == "RayService")["spec"]["rayClusterConfig"]
    probe = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert (probe["periodSeconds"], probe["timeoutSeconds"]) == (3, 2)


def test_the_pod_monitor_scrapes_every_ray_pods_metrics_port():
    assert not [o for o in objects("default") if o["kind"] == "PodMonitor"]  # needs the operator's CRDs
    objs = _objects(_render({"metrics": {"podMonitor": {"enabled": True, "interval": "15s",
                                                        "labels": {"release": "kube-prometheus"}}}}))
    monitor = one(objs, "PodMonitor", "demo-qzoom")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == \
        "kube-prometheus"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == ("metrics", "/metrics", "15s")
    selector = monitor["spec"]["selector"]
    pods = [t for t in pod_templates("default").values() if "ray-" in t["metadata"]["labels"].get(
        "app.kubernetes.io/component", "")]
    assert len(pods) == 3  # the head and both worker groups
    for pod in pods:
        labels = pod["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector["matchLabels"].items())
        assert labels["app.kubernetes.io/component"] in selector["matchExpressions"][0]["values"]
        assert "metrics" in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_the_disruption_budget_covers_the_worker_pods_with_an_integer_min_available():
    assert not [o for o in objects("default") if o["kind"] == "PodDisruptionBudget"]
    objs = _objects(_render({"podDisruptionBudget": {"enabled": True, "minAvailable": 2}}))
    pdb = one(objs, "PodDisruptionBudget", "demo-qzoom-workers")
    kubernetes_validate.validate(pdb, K8S_VERSION, strict=True)
    assert pdb["spec"]["minAvailable"] == 2 and "maxUnavailable" not in pdb["spec"]
    selector = pdb["spec"]["selector"]["matchLabels"]
    matched = [name for name, pod in pod_templates("default").items()
               if all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())]
    assert sorted(matched) == ["coarse", "zoom"]
    assert "minAvailable" in render_error({"podDisruptionBudget": {"enabled": True, "minAvailable": "50%"}})


@pytest.mark.parametrize("case", CASES)
def test_notes_name_the_client_only_command_health_and_metrics(case):
    text = notes(case)
    assert "pip install qzoom-client" in text and "qzoom-client health --addr localhost:9000" in text
    assert "grpc.health.v1" in text and "/metrics" in text


# ---------------------------------------------------------------------------------------------
# Limits: backpressure, the request timeout and the proxy's message size


@pytest.mark.parametrize("case", ["default", "gpu-production.yaml"])
def test_every_deployment_has_bounded_queues_and_the_proxy_a_request_timeout(case):
    config = serve_config(case)
    assert 0 < config["grpc_options"]["request_timeout_s"] <= 600
    for d in config["applications"][0]["deployments"]:
        assert d["max_ongoing_requests"] >= 1 and d["max_queued_requests"] >= 1, d


def _message_limits(values: dict) -> set[str]:
    manifests = _render(values)
    spec = one(_objects(manifests), "RayService")["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    return {env_of(t["spec"]["containers"][0])["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]["value"] for t in templates}


def test_every_ray_node_limits_grpc_messages_to_the_largest_accepted_image():
    from qzoom_service.config import EngineConfig
    from qzoom_service.serve.settings import grpc_message_limit

    assert _message_limits({}) == {str(grpc_message_limit(EngineConfig()))}
    raised = {"serve": {"extraArgs": {"max_image_bytes": 64 << 20}}}
    assert _message_limits(raised) == {str(grpc_message_limit(EngineConfig(max_image_bytes=64 << 20)))}

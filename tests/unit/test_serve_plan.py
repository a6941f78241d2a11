"""`qzoom serve`'s plan: the Serve config it deploys, built from flags, the config file and the environment."""

from __future__ import annotations

import pytest

from qzoom_service.errors import InvalidInput
from qzoom_service.serve.run import plan_local
from qzoom_service.serve.settings import HEALTH_SERVICER_FUNCTION, SERVICER_FUNCTION

from ..helpers import free_port


def _plan(tmp_path=None, config: str | None = None, environ=None, **flags):
    path = None
    if config is not None:
        path = tmp_path / "serve.yaml"
        path.write_text(config)
    ports = dict(grpc_port=free_port(), http_port=free_port(), dashboard_port=free_port())
    return plan_local(config_path=path, environ=environ or {}, **{**ports, **flags})


APP = "applications:\n  - name: qzoom\n    import_path: qzoom_service.serve.app:build_app\n"


def test_host_is_the_flag_else_the_file_else_the_environment_else_loopback(tmp_path):
    assert _plan().host == "127.0.0.1"
    assert _plan(environ={"QZOOM_SERVE_HOST": "0.0.0.0"}).host == "0.0.0.0"
    in_file = "http_options: {host: 0.0.0.0}\n" + APP
    assert _plan(tmp_path, in_file, environ={"QZOOM_SERVE_HOST": "10.0.0.1"}).host == "0.0.0.0"
    assert _plan(tmp_path, in_file, host="127.0.0.1").host == "127.0.0.1"


def test_api_keys_and_offline_mode_reach_the_replicas_environment(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alpha-key\nbeta-key,gamma-key\n")
    plan = _plan(api_keys=["cli-key"], api_key_file=str(keys), environ={"HF_HUB_OFFLINE": "1"})
    env_vars = plan.app["runtime_env"]["env_vars"]
    assert env_vars == {"QZOOM_API_KEYS": "cli-key,alpha-key,beta-key,gamma-key", "HF_HUB_OFFLINE": "1"}
    assert "runtime_env" not in _plan().app  # nothing asked for: nothing added


def test_device_and_dtype_flags_win_over_the_file_and_the_servicer_is_registered_once(tmp_path):
    config = f"grpc_options:\n  grpc_servicer_functions: [{SERVICER_FUNCTION}]\n" + APP + \
        "    args: {dtype: bfloat16, max_new_tokens: 9}\n"
    plan = _plan(tmp_path, config, dtype="float16", device="cpu")
    assert (plan.args["engine"]["dtype"], plan.args["engine"]["max_new_tokens"]) == ("float16", 9)
    assert plan.config["grpc_options"]["grpc_servicer_functions"] == [SERVICER_FUNCTION, HEALTH_SERVICER_FUNCTION]


@pytest.mark.parametrize(("flags", "message"), [
    ({"api_key_file": "/nonexistent/keys"}, "cannot read --api-key-file /nonexistent/keys"),
    ({"api_keys": ["a,b"]}, "an API key may not contain a comma"),
    ({"model": "not a/valid//id"}, "no such directory, and not a Hugging Face hub id"),
])
def test_bad_flags_name_what_is_wrong(flags, message):
    with pytest.raises(InvalidInput, match=message):
        _plan(**flags)


def test_a_checkpoint_directory_needs_a_config_json(tmp_path):
    with pytest.raises(InvalidInput, match="has no config.json"):
        _plan(model=str(tmp_path))

"""One config: the engine's settings live in EngineConfig (resolved once against the model), the service's
in AppSettings with an `engine: EngineConfig`; bad settings fail before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qzoom_service.config import EngineConfig, RequestOptions, nvidia_driver_present
from qzoom_service.engine import QZoomEngine
from qzoom_service.errors import InvalidInput
from qzoom_service.serve.run import plan_local
from qzoom_service.serve.settings import AppSettings

from ..helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_app_settings_hold_one_engine_config_and_round_trip():
    settings = AppSettings.from_dict({"model": "m", "device": "cpu", "max_batch_size": 4, "cache_ttl_s": 5,
                                      "engine": {"max_new_tokens": 7}})
    assert isinstance(settings.engine, EngineConfig)
    assert (settings.engine.model, settings.engine.max_batch_size, settings.engine.max_new_tokens) == ("m", 4, 7)
    assert not hasattr(settings, "max_batch_size") and not hasattr(settings, "model")
    assert AppSettings.from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize("args,message", [
    ({"colour": "red"}, "unknown qzoom app args: colour"),
    ({"engine": {"colour": "red"}}, "unknown engine config keys: colour"),
    ({"dtype": "int8"}, "dtype must be float32, bfloat16 or float16"),
    ({"device": "gpu"}, "device must be cpu, cuda, cuda:N or mps; got 'gpu'"),
    ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
    ({"engine": "fast"}, "'engine' must be a mapping"),
])
def test_bad_app_settings_name_the_key(args, message):
    with pytest.raises(InvalidInput, match=message):
        AppSettings.from_dict(args)


def test_checkpoint_defaults_are_resolved_once_into_a_frozen_config(tiny_loaded):
    engine = QZoomEngine(tiny_loaded, EngineConfig(gate_threshold=0.7))
    config = engine.config
    assert config.gate_threshold == 0.7  # set: kept
    assert config.roi_threshold == tiny_loaded.checkpoint.roi_threshold  # unset: the checkpoint's
    assert config.reuse_src_pos is tiny_loaded.checkpoint.reuse_src_pos
    token = tiny_loaded.factor**2
    assert (config.min_pixels, config.max_pixels) == (256 * token, 576 * token)
    for loose in ("reuse_src_pos", "default_gate", "default_roi"):
        assert not hasattr(engine, loose)
    with pytest.raises(Exception):
        config.gate_threshold = 0.2  # frozen


def test_budgets_are_checked_against_the_models_factor():
    with pytest.raises(InvalidInput, match="between 1024 \\(1 token\\) and 16777216 pixels; got 1000"):
        RequestOptions(min_pixels=1000).validate(factor=32)
    RequestOptions(min_pixels=1000).validate(factor=28)
    with pytest.raises(InvalidInput, match="min_pixels/max_pixels must be between 784"):
        EngineConfig(min_pixels=10).resolve(gate_threshold=0.1, roi_threshold=0.1, min_pixels=784, max_pixels=784,
                                            reuse_src_pos=False, factor=28)


def _qzoom(*args, env=None, timeout=60):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qzoom_service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    return proc, time.monotonic() - start


def _assert_fails_fast_without_ray(proc, elapsed, message):
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err and err.startswith("qzoom serve: INVALID_ARGUMENT: ")
    assert "ray" not in (proc.stdout + err).lower().replace("array", "")  # no Ray start, no Ray log line
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_serve_with_a_typo_in_its_config_fails_fast(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - name: qzoom\n    import_path: qzoom_service.serve.app:build_app\n"
                   "    args:\n      max_new_tokns: 32\n")
    proc, elapsed = _qzoom("serve", "--config", str(bad))
    _assert_fails_fast_without_ray(proc, elapsed, "unknown qzoom app args: max_new_tokns")


def test_serve_with_a_bad_engine_variable_fails_fast():
    proc, elapsed = _qzoom("serve", env={"QZOOM_DTYPE": "int8"})
    _assert_fails_fast_without_ray(proc, elapsed, "dtype must be float32, bfloat16 or float16; got 'int8'")


@pytest.mark.skipif(nvidia_driver_present(), reason="this machine has an NVIDIA driver")
def test_serve_gpu_config_on_a_cpu_machine_fails_fast():
    proc, elapsed = _qzoom("serve", "--config", "configs/serve-gpu.yaml")
    _assert_fails_fast_without_ray(proc, elapsed, "device='cuda' needs a CUDA GPU and this machine has none")


@pytest.mark.skipif(nvidia_driver_present(), reason="this machine has an NVIDIA driver")
def test_a_gpu_deployment_without_cuda_device_fails_before_ray(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - name: qzoom\n    import_path: qzoom_service.serve.app:build_app\n"
                      "    deployments:\n      - name: Zoom\n        ray_actor_options: {num_gpus: 1}\n")
    with pytest.raises(InvalidInput, match="deployment Zoom needs 1 GPU"):
        plan_local(config_path=str(config), environ={})


def test_engine_variables_reach_serve_under_the_config_file_and_the_flags(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - name: qzoom\n    import_path: qzoom_service.serve.app:build_app\n"
                      "    args:\n      max_new_tokens: 9\n")
    env = {"QZOOM_MAX_NEW_TOKENS": "5", "QZOOM_MAX_QUESTION_CHARS": "100", "QZOOM_MODEL": "from-env"}
    ports = dict(grpc_port=free_port(), http_port=free_port(), dashboard_port=free_port())
    plan = plan_local(config_path=str(config), model="from-flag", environ=env, **ports)
    engine = AppSettings.from_dict(plan.args).engine
    assert (engine.max_new_tokens, engine.max_question_chars, engine.model) == (9, 100, "from-flag")


def test_local_serve_turns_reflection_on_and_a_config_file_decides_for_itself(tmp_path):
    ports = dict(grpc_port=free_port(), http_port=free_port(), dashboard_port=free_port())
    plan = plan_local(environ={}, **ports)
    assert plan.config["grpc_options"]["enable_reflection"] is True  # grpcurl works against `qzoom serve`
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"grpc_options": {"enable_reflection": False}, "applications": [
        {"name": "qzoom", "import_path": "qzoom_service.serve.app:build_app", "args": {}}]}))
    assert plan_local(config_path=str(config), environ={}, **ports).config["grpc_options"]["enable_reflection"] is False

"""A newcomer's path: `qzoom serve` (the real command, embedded default) then `qzoom ask` / `qzoom zoom`; an
operator's: what it prints, `serve status`, and mistakes that fail before Ray starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from qzoom_service.config import nvidia_driver_present

from ..helpers import free_port, make_image

QZOOM = [sys.executable, "-m", "qzoom_service.cli"]


@pytest.fixture(scope="module")
def served(qzoom_service):
    """The session's `qzoom serve` (tests/serving.py): one Ray cluster for every test that needs the service."""
    log = qzoom_service.log.read_text()
    assert qzoom_service.address.rsplit(":", 1)[1] in log and "tiny RANDOM model" not in log
    return qzoom_service.address


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(QZOOM + list(args), capture_output=True, text=True, timeout=180)


def test_ask_and_zoom_against_qzoom_serve(served, tmp_path):
    image = tmp_path / "photo.png"
    make_image(640, 480, seed=31).save(image)
    ask = _run("ask", "--addr", served, "--image", str(image), "--question", "What colour is it?", "--json")
    assert ask.returncode == 0, ask.stderr
    answer = json.loads(ask.stdout)
    assert answer["route"] in ("direct", "zoom") and len(answer["image_id"]) == 64
    assert answer["visual_tokens"]["coarse"] > 0 and "cache_hit" in answer
    crop = tmp_path / "crop.png"
    zoom = _run("zoom", "--addr", served, "--image", str(image), "--box", "0,0,500,500", "--space", "norm1000",
                "--question", "What digit?", "--out", str(crop), "--json")
    assert zoom.returncode == 0, zoom.stderr
    z = json.loads(zoom.stdout)
    assert z["box"]["original"] == [0, 0, 320, 240] and Image.open(crop).size == (320, 240)
    assert z["answer"] is not None and z["visual_tokens"]["zoom"] > 0
    missing = _run("ask", "--addr", served, "--image", "f" * 64, "--question", "q")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr


def test_the_embedded_model_answers_through_the_service(served, tmp_path):
    from qzoom_service.synthetic import make_sample

    sample = make_sample("hr", 4242, 0, fine_fraction=0.0)  # held out: training used seed 7 and neighbours
    image = tmp_path / "scene.png"
    sample.image.save(image)
    ask = _run("ask", "--addr", served, "--image", str(image), "--question", sample.question, "--json")
    assert ask.returncode == 0, ask.stderr
    answer = json.loads(ask.stdout)
    assert answer["answer"] and answer["visual_tokens"]["coarse"] <= 144
    # A fine question zoomed on the dot's box, as an agent's zoom tool would: the dot is a few pixels in the
    # coarse view, clear in the crop.
    fine = make_sample("doc", 4242, 7, fine_fraction=1.0)
    fine.image.save(image)
    box = ",".join(map(str, fine.target_box))
    zoom = _run("zoom", "--addr", served, "--image", str(image), "--box", box, "--space", "original",
                "--question", fine.question, "--json")
    assert zoom.returncode == 0, zoom.stderr
    assert json.loads(zoom.stdout)["answer"] == fine.answer
    # The same question asked plainly: the gate opens and the model's own SD-RPN finds the box.
    auto = _run("ask", "--addr", served, "--image", str(image), "--question", fine.question, "--json")
    assert auto.returncode == 0, auto.stderr
    routed = json.loads(auto.stdout)
    assert routed["route"] == "zoom" and routed["answer"] == fine.answer, routed


def test_serve_prints_its_dashboard_and_metrics_and_serve_status_sees_the_app(served, qzoom_service):
    log = qzoom_service.log.read_text()
    assert f"metrics:    http://127.0.0.1:{qzoom_service.metrics_port}/metrics" in log
    assert f"dashboard:  {qzoom_service.dashboard}" in log and "every interface" in log
    status = subprocess.run([str(Path(sys.executable).parent / "serve"), "status", "--address",
                             qzoom_service.dashboard], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    apps = {a["name"]: a for a in _status_apps(status.stdout)}
    assert apps["qzoom"]["status"] == "RUNNING", status.stdout


def _status_apps(text: str) -> list[dict]:
    import yaml

    return [{"name": name, **app} for name, app in yaml.safe_load(text)["applications"].items()]


# -- mistakes fail before Ray: exit 2, one line, no traceback, fast ------------------------------------

# The brief's bound is 2 s on an idle machine; shared CI cores get some room (Ray alone takes far longer).
FAST_S = 5.0


def _serve_fails(*args, env=None) -> str:
    """Run `qzoom serve` on free ports, assert it fails fast the way an operator should see it; its stderr."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_OFFLINE")}
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port()), "--dashboard-port", str(free_port())]
    start = time.monotonic()
    proc = subprocess.run(QZOOM + ["serve", *ports, *args], capture_output=True, text=True, timeout=60,
                          env={**environ, **(env or {})})
    elapsed = time.monotonic() - start
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("qzoom serve: "), err
    assert elapsed < FAST_S, f"took {elapsed:.1f} s: {err}"
    return err


@pytest.mark.parametrize("case", ["missing-dir", "not-a-hub-id", "offline-flag", "offline-env", "key-file"])
def test_bad_invocations_fail_before_ray(case, tmp_path):
    hf_home = {"HF_HOME": str(tmp_path / "hf")}  # an empty cache: nothing is cached
    args, env, message = {
        "missing-dir": (["--model", str(tmp_path / "weights")], {}, "no such directory"),
        "not-a-hub-id": (["--model", "no//such id"], {}, "not a Hugging Face hub id"),
        "offline-flag": (["--offline", "--model", "qzoom-test/absent"], hf_home, "not in the local Hugging Face cache"),
        "offline-env": (["--model", "qzoom-test/absent"], {**hf_home, "HF_HUB_OFFLINE": "1"},
                        "not in the local Hugging Face cache"),
        "key-file": (["--api-key-file", str(tmp_path / "keys")], {}, "cannot read --api-key-file"),
    }[case]
    assert message in _serve_fails(*args, env=env)


@pytest.mark.skipif(nvidia_driver_present(), reason="this machine has an NVIDIA driver")
def test_cuda_without_cuda_fails_before_ray():
    assert "device='cuda' needs a CUDA GPU" in _serve_fails("--device", "cuda")


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port"])
def test_a_port_in_use_is_refused_before_ray(flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _serve_fails(flag, str(port))  # given last: wins over the free one
    assert f"port {port} is in use" in err

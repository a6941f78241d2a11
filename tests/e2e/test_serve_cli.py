"""A newcomer's path: `qzoom serve` (the real command, embedded default) then `qzoom ask` / `qzoom zoom`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from ..helpers import make_image

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

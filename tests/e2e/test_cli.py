"""`qzoom answer` as a user runs it: a real process, a checkpoint directory, JSON out, an overlay file."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from ..helpers import make_image

QZOOM = [sys.executable, "-m", "qzoom_service.cli"]


def test_answer_json_has_the_documented_fields(tmp_path, tiny_checkpoint):
    image = tmp_path / "in.png"
    make_image(500, 400, seed=4).save(image)
    overlay = tmp_path / "overlay.png"
    out = subprocess.run(
        QZOOM + ["answer", "--model", str(tiny_checkpoint), "--image", str(image), "--question", "What colour?",
                 "--mode", "zoom", "--roi-threshold", "0.5", "--max-new-tokens", "4", "--min-pixels", "50176",
                 "--max-pixels", "112896", "--json", "--overlay", str(overlay)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("answer", "route", "gate_score", "roi_box", "roi_map", "visual_tokens", "generated_ids", "timings_ms"):
        assert key in result
    assert result["route"] == "zoom" and result["gate_score"] is None
    x1, y1, x2, y2 = result["roi_box"]
    assert 0 <= x1 < x2 <= 500 and 0 <= y1 < y2 <= 400
    assert set(result["visual_tokens"]) == {"coarse", "zoom"} and result["visual_tokens"]["zoom"] > 0
    assert len(result["generated_ids"]) <= 4 and result["timings_ms"]["total"] > 0
    assert Image.open(overlay).size == (500, 400)


def test_bad_input_exits_2_with_the_status_name(tmp_path, tiny_checkpoint):
    image = tmp_path / "broken.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = subprocess.run(QZOOM + ["answer", "--model", str(tiny_checkpoint), "--image", str(image), "--question", "q"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "INVALID_ARGUMENT" in out.stderr and "not a readable image" in out.stderr

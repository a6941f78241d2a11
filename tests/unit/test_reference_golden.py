"""Same checkpoint, inputs and thresholds -> the route, RoI box, gate score and generated ids that the
reference implementation (YuHengsss/Q-Zoom, transformers 4.51.3 fork) produced, fp32 on CPU.

The expectations in tests/fixtures/reference_golden.json were recorded by running the reference code on
`build_tiny(seed=0)` saved in the released layout (both `reuse_src_pos` settings), at two pixel budgets
(one where the sink mask and the 28-px box growth are active), gate forced closed, forced open, and a
threshold between gate scores. The reference is not vendored; only its outputs are.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine
from qzoom_service.model import load_model
from qzoom_service.tiny import TinySpec, build_tiny, save_tiny
from qzoom_service.types import Request

GOLDEN = json.loads((Path(__file__).parents[1] / "fixtures" / "reference_golden.json").read_text())


def _images() -> list[bytes]:
    """The recorded inputs: noise with a red square, drawn from one generator in sequence."""
    rng = np.random.default_rng(1)
    out = []
    for size in GOLDEN["images"]:
        w, h = size["width"], size["height"]
        img = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
        ImageDraw.Draw(img).rectangle([w // 3, h // 3, w // 3 + w // 6, h // 3 + h // 6], fill=(255, 0, 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = {}
    for reuse in (True, False):
        model, processor = build_tiny(0, replace(TinySpec(), reuse_src_pos=reuse))
        ckpt = save_tiny(model, processor, tmp_path_factory.mktemp(f"golden{int(reuse)}") / "ckpt")
        out[reuse] = QZoomEngine(load_model(str(ckpt)), EngineConfig())
    return out


def test_engine_reproduces_the_reference_outputs(engines):
    images = _images()
    records = GOLDEN["records"]
    assert len(records) > 100 and sum(r["expect"]["route"] == "zoom" for r in records) > 50
    mismatches = []
    for i, rec in enumerate(records):
        options = RequestOptions(
            gate_threshold=min(rec["tau_gate"], 1.0),  # the reference's 2.0 means "never zoom"
            roi_threshold=rec["tau_roi"], min_pixels=rec["min_pixels"], max_pixels=rec["max_pixels"],
            max_new_tokens=rec["max_new_tokens"], prompt_suffix=GOLDEN["prompt_suffix"],
        )
        engine = engines[rec["reuse_src_pos"]]
        request = Request(images[rec["case"]], rec["question"], options)
        prepared = engine.prepare(request)
        result = engine.answer([prepared])[0]
        expect = rec["expect"]
        got = {
            "route": result.route,
            "roi_box": list(result.roi_box) if result.roi_box else None,
            "generated_ids": result.generated_ids,
            "prompt_len": prepared.input_ids.shape[1],
            "coarse_grid_thw": prepared.grid_thw[0].tolist(),
        }
        want = {k: expect[k] for k in got}
        if got != want or abs(result.gate_score - expect["gate_score"]) > 1e-4:
            mismatches.append((i, got, want, result.gate_score, expect["gate_score"]))
    assert not mismatches, mismatches[:3]

"""The embedded model's card is what its recipe writes: `--stage card` on the shipped reports reproduces it,
so a retrain keeps every section (history included) and every figure comes from the reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from qzoom_service.model import EMBEDDED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]


def _recipe():
    sys.path.insert(0, str(ROOT))
    try:
        from recipes import train_embedded_model
    finally:
        sys.path.remove(str(ROOT))
    return train_embedded_model


def _work_dir_from_shipped_reports(work: Path) -> None:
    """The files `stage_card` reads, rebuilt from the shipped config.json and training_report.json."""
    report = json.loads((EMBEDDED_MODEL_DIR / "training_report.json").read_text())
    files = {"export/config.json": json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text()),
             "rpn/report.json": report["rpn"], "rpn/roi_threshold.json": report["roi_threshold"],
             "gate/calibration.json": report["gate"],
             **{f"bench/{split}/results.json": results for split, results in report["bench"].items()}}
    for name, content in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(json.dumps(content))


def test_the_shipped_model_card_is_the_recipes_card_of_the_shipped_reports(tmp_path):
    work, export = tmp_path / "work", tmp_path / "export"
    _work_dir_from_shipped_reports(work)
    # The shipped release continued earlier ones (see its "Release lineage"), with the recipe's defaults.
    argv = ["--work", str(work), "--stage", "card", "--export", str(export),
            "--base-init", "qzoom_service/assets/qzoom-synth-tiny"]
    threads = torch.get_num_threads()
    try:
        assert _recipe().main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets the recipe's own thread count
    card = (export / "README.md").read_text()
    assert card == (EMBEDDED_MODEL_DIR / "README.md").read_text()
    for section in ("## How it was trained", "## What made the SD-RPN work", "## Release lineage"):
        assert section in card, section

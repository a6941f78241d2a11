"""`qzoom train ...` end to end on the tiny checkpoint and a small synthetic set (in-process)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from qzoom_service.synthetic import generate, write_dataset
from qzoom_service.model import load_model
from qzoom_service.cli import main
from qzoom_service.train.gate_labels import LadderSet, load_ladders, save_ladders


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(generate("hr", 4, seed=11, width=448, height=336), tmp_path_factory.mktemp("cli-data"))


def _run(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(["train", *map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else None, err


def test_the_four_commands_chain_into_a_loadable_checkpoint(tiny_checkpoint, data, tmp_path, capsys):
    code, info, _ = _run(capsys, "rpn-labels", "--model", tiny_checkpoint, "--data", data, "--out", tmp_path / "lab",
                         "--token-budget", 36, "--max-new-tokens", 4, "--heads", "3:0,1", "--sink-heads", "1:2")
    assert code == 0 and info["samples"] + sum(info["dropped"].values()) == 4
    teacher = info["teacher"]  # the synthetic rows carry target_box: the teacher's localisation is measured
    assert teacher["samples"] == info["samples"] and teacher["usable"] <= teacher["samples"]
    assert all(0.0 <= teacher[k] <= 1.0 for k in ("peak_hit_rate", "fg_hit_rate", "chance")) and teacher["chance"] > 0

    # The random tiny model does not localise: accept every box and any peak so some cells are labelled.
    code, info, _ = _run(capsys, "rpn", "--model", tiny_checkpoint, "--data", tmp_path / "lab", "--out",
                         tmp_path / "rpn", "--max-box-frac", 1.01, "--min-peak", 0, "--steps", 2, "--batch-size", 2,
                         "--save-every", 1, "--lr", 1e-3)
    assert code == 0 and info["steps"] == 2 and info["K"] == 2 and info["T"] == 2
    stage1 = tmp_path / "rpn" / "model"
    assert load_model(str(stage1)).branches.has_rpn
    assert sorted(p.name for p in (tmp_path / "rpn" / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]

    code, info, _ = _run(capsys, "gate-labels", "--model", stage1, "--data", data, "--out", tmp_path / "lad",
                         "--resolutions", 16, 25, 36, "--max-new-tokens", 2)
    assert code == 0 and info["samples"] == 4
    ladders = load_ladders(tmp_path / "lad")
    assert all(len(lad.answers) == 3 for lad in ladders.ladders)

    # Random answers rarely survive the consistency filter: give the gate a ladder set with known outcomes.
    fixed = [replace(lad, answers=("zz", lad.answer, lad.answer) if i % 2 else (lad.answer,) * 3)
             for i, lad in enumerate(ladders.ladders)]
    fixed += [replace(lad, uid=lad.uid + "b", answers=("zz", "zz", lad.answer, lad.answer), res=(9, 16, 25, 36))
              for lad in ladders.ladders]
    save_ladders(LadderSet(ladders.settings, fixed), tmp_path / "lad2")
    code, info, _ = _run(capsys, "gate", "--model", stage1, "--data", tmp_path / "lad2", "--out", tmp_path / "gate",
                         "--steps", 1, "--batch-size", 4, "--gate-threshold", 0.2)
    assert code == 0 and info["role"] == "gate"
    final = load_model(info["model"])
    assert final.branches.has_rpn and final.branches.has_gate and final.checkpoint.gate_threshold == pytest.approx(0.2)

    # Without --gate-threshold the held-out table chooses it: the middle of the thresholds tied at the best.
    code = main(["train", "gate", "--model", str(stage1), "--data", str(tmp_path / "lad2"), "--out",
                 str(tmp_path / "gate2"), "--steps", "1", "--batch-size", "4", "--holdout", "0.25", "--quiet"])
    assert code == 0 and "gate threshold" in capsys.readouterr().out
    table = json.loads((tmp_path / "gate2" / "calibration.json").read_text())
    best = max(r["accuracy"] for r in table)
    tied = [r["threshold"] for r in table if r["accuracy"] == best]
    assert load_model(str(tmp_path / "gate2" / "model")).checkpoint.gate_threshold == pytest.approx(
        sorted(tied)[(len(tied) - 1) // 2])


def test_calibrate_roi_chooses_and_writes_the_tightest_threshold_near_the_best(tiny_checkpoint, data, tmp_path,
                                                                               capsys):
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    code, info, _ = _run(capsys, "calibrate-roi", "--model", model, "--data", data, "--token-budget", 36,
                         "--thresholds", 0.05, 0.2, 0.5, 0.9, "--out", tmp_path / "roi.json", "--write-config")
    assert code == 0 and info["samples"] == 4 and info["written"] is True
    table = info["table"]
    assert [r["threshold"] for r in table] == [0.05, 0.2, 0.5, 0.9]
    best = max(r["hit_rate"] for r in table)
    assert info["roi_threshold"] == max(r["threshold"] for r in table if r["hit_rate"] >= best - 0.02)
    assert json.loads((tmp_path / "roi.json").read_text()) == {"roi_threshold": info["roi_threshold"], "table": table}
    assert load_model(str(model)).checkpoint.roi_threshold == pytest.approx(info["roi_threshold"])


def test_calibrate_roi_refuses_a_row_without_a_box_before_loading(tiny_checkpoint, data, tmp_path, capsys):
    rows = data.read_text().splitlines()
    rows[1] = json.dumps({k: v for k, v in json.loads(rows[1]).items() if k != "target_box"})
    bad = tmp_path / "no_box.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    (tmp_path / "images").symlink_to(data.parent / "images")
    code, _, err = _run(capsys, "calibrate-roi", "--model", tiny_checkpoint, "--data", bad)
    assert code == 2 and f"{bad}: row 2: 'target_box'" in err


def test_rpn_on_box_labels_and_resume(tiny_checkpoint, data, tmp_path, capsys):
    args = ["rpn", "--model", tiny_checkpoint, "--data", data, "--out", tmp_path / "run", "--token-budget", 36,
            "--steps", 2, "--batch-size", 2, "--save-every", 1]
    code, first, _ = _run(capsys, *args)
    assert code == 0 and first["resumed_at"] == 0
    code, again, _ = _run(capsys, *args, "--resume")
    assert code == 0 and again["resumed_at"] == 2 and again["final_loss"] is None  # nothing left to run


def test_a_bad_row_fails_with_its_row_number(tiny_checkpoint, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = data.read_text().splitlines()
    rows[2] = json.dumps({**json.loads(rows[2]), "answer": ""})
    bad.write_text("\n".join(rows).replace(str(data.parent), "") + "\n")
    (tmp_path / "images").symlink_to(data.parent / "images")
    code, _, err = _run(capsys, "gate-labels", "--model", tiny_checkpoint, "--data", bad, "--out", tmp_path / "x",
                        "--resolutions", 16, 25, 36)
    assert code == 2 and f"{bad}: row 3: 'answer' is empty" in err
    assert not (tmp_path / "x").exists()

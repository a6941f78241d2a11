"""Post-training measurements and threshold choices (train/calibrate.py) on small maps with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qzoom_service.errors import InvalidInput
from qzoom_service.train.calibrate import (RoiMap, boxed_questions, choose_gate_threshold, choose_roi_threshold,
                                           gate_table_text, roi_threshold_table, teacher_hit_rate,
                                           write_serving_thresholds)
from qzoom_service.train.data import Record
from qzoom_service.train.rpn_labels import PseudoLabel, PseudoLabelSet


def _label(uid: str, grid_hw, original_size, peak=None) -> PseudoLabel:
    """A raw teacher map: 1.0 on the `peak` cell (row, col), 0 elsewhere; uniform when `peak` is None."""
    g = torch.ones(grid_hw) if peak is None else torch.zeros(grid_hw)
    if peak is not None:
        g[peak] = 1.0
    return PseudoLabel(uid, 1, Path("x.png"), "q", "a", "textual", original_size, g, torch.zeros(grid_hw))


def test_teacher_hit_rate_counts_peaks_and_foreground_on_the_targets_cells():
    size, grid = (800, 600), (6, 8)  # 100 px cells
    labels = PseudoLabelSet({"square_pad": False}, [
        _label("a", grid, size, peak=(1, 2)),  # on its target: a hit
        _label("b", grid, size, peak=(0, 0)),  # far from its target: a miss
        _label("c", grid, size, peak=(3, 3)),  # no box given: not counted
        _label("d", grid, size),  # uniform: argmax cell (0, 0) holds the target, but every cell is ignored
    ])
    boxes = {"a": (210, 110, 240, 140), "b": (610, 410, 690, 490), "d": (10, 10, 50, 50)}
    rate = teacher_hit_rate(labels, boxes)
    assert rate == {"samples": 3, "peak_hit_rate": pytest.approx(2 / 3), "usable": 2, "fg_hit_rate": 0.5,
                    "chance": pytest.approx(1 / 48)}


def test_teacher_hit_rate_places_the_target_on_the_square_padded_grid():
    # 400 x 200 padded to 400 x 400: the content starts 100 px down, so a box at y 10-40 sits in row 2 of 8.
    labels = PseudoLabelSet({"square_pad": True}, [_label("a", (8, 8), (400, 200), peak=(2, 0))])
    rate = teacher_hit_rate(labels, {"a": (10, 10, 40, 40)})
    assert rate["peak_hit_rate"] == 1.0 and rate["fg_hit_rate"] == 1.0 and rate["chance"] == pytest.approx(1 / 64)


def _left_half() -> torch.Tensor:
    """8 x 8 map, 1.0 on columns 0-3. Blurred (3x3, sigma 1): columns 0-2 stay 1.0, column 3 falls to
    ~0.73 and column 4 rises to ~0.27; so thresholds 0.2 / 0.5 / 0.8 give boxes 500 / 400 / 300 px wide."""
    prob = torch.zeros(8, 8)
    prob[:, :4] = 1.0
    return prob


def test_roi_table_counts_contained_targets_over_every_question_and_measures_the_boxes():
    maps = [RoiMap(_left_half(), (800, 800), (320, 300, 380, 360), 28),  # column 3
            RoiMap(_left_half(), (800, 800), (420, 300, 480, 360), 28),  # column 4
            RoiMap(None, (800, 800), (100, 100, 150, 150), 28)]  # no RoI at all: a miss at every threshold
    table = roi_threshold_table(maps, (0.2, 0.5, 0.8))
    assert [r["threshold"] for r in table] == [0.2, 0.5, 0.8]
    assert [r["hit_rate"] for r in table] == pytest.approx([2 / 3, 1 / 3, 0.0])
    sides = [(w * 800) ** 0.5 for w in (500, 400, 300)]
    assert [r["mean_box_side"] for r in table] == pytest.approx(sides, rel=1e-4)
    assert roi_threshold_table([RoiMap(None, (800, 800), (0, 0, 9, 9), 28)], (0.5,))[0]["mean_box_side"] is None


def test_roi_threshold_is_the_tightest_within_tolerance_of_the_best():
    table = [{"threshold": 0.2, "hit_rate": 2 / 3}, {"threshold": 0.5, "hit_rate": 1 / 3},
             {"threshold": 0.8, "hit_rate": 0.0}]
    assert choose_roi_threshold(table) == 0.2
    assert choose_roi_threshold(table, tolerance=0.34) == 0.5
    with pytest.raises(InvalidInput):
        choose_roi_threshold([])


def _gate_rows(accuracies):
    return [{"threshold": round(0.1 * (i + 1), 1), "precision": None if a is None else 0.5, "recall": 0.25,
             "zoom_rate": 0.5, "accuracy": a} for i, a in enumerate(accuracies)]


def test_gate_threshold_is_the_middle_of_the_tied_best():
    assert choose_gate_threshold(_gate_rows([0.5, 0.8, 0.8, 0.8, 0.6, None])) == 0.3
    assert choose_gate_threshold(_gate_rows([0.9, 0.9, 0.4])) == 0.1  # an even tie takes the lower middle
    assert choose_gate_threshold(_gate_rows([0.4, 0.7, 0.9])) == 0.3
    with pytest.raises(InvalidInput, match="no accuracy"):
        choose_gate_threshold(_gate_rows([None, None]))


def test_gate_table_text_has_a_line_per_threshold_and_dashes_for_missing_values():
    lines = gate_table_text(_gate_rows([0.5, None])).splitlines()
    assert lines[0].split() == ["threshold", "precision", "recall", "zoom_rate", "accuracy"]
    assert lines[1].split() == ["0.10", "0.50", "0.25", "0.50", "0.50"]
    assert lines[2].split() == ["0.20", "-", "0.25", "0.50", "-"]


def test_write_serving_thresholds_sets_only_the_given_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"roi_thresh": 0.1, "high_res_thresh": 0.1, "keep": 1}))
    write_serving_thresholds(tmp_path, roi_threshold=0.25)
    assert json.loads((tmp_path / "config.json").read_text()) == {"roi_thresh": 0.25, "high_res_thresh": 0.1,
                                                                  "keep": 1}
    write_serving_thresholds(tmp_path, gate_threshold=0.4)
    assert json.loads((tmp_path / "config.json").read_text())["high_res_thresh"] == 0.4
    with pytest.raises(InvalidInput, match="probabilities"):
        write_serving_thresholds(tmp_path, roi_threshold=1.5)
    with pytest.raises(InvalidInput, match="config.json"):
        write_serving_thresholds(tmp_path / "missing", roi_threshold=0.2)


def test_boxed_questions_check_every_box_before_opening_any_image(tmp_path):
    good = Record(tmp_path / "absent.png", "q", "a", 1, tmp_path / "d.jsonl", {"target_box": [1, 2, 30, 40]})
    bad = Record(tmp_path / "absent.png", "q", "a", 2, tmp_path / "d.jsonl", {"target_box": [1, 2]})
    with pytest.raises(InvalidInput, match="row 2: 'target_box'"):
        boxed_questions([good, bad])
    with pytest.raises(InvalidInput, match="row 1"):  # the image is opened only when iterated
        next(iter(boxed_questions([good])))

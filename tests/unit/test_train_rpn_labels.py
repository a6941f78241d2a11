"""Stage-1 label rules on hand-made maps: tri-state thresholds, box dilation, sinks, padding, dropping."""

from __future__ import annotations

import pytest
import torch

from qzoom_service.errors import InvalidInput
from qzoom_service.train.rpn_labels import (
    IGNORE,
    HeadSet,
    PseudoLabel,
    PseudoLabelSet,
    default_heads,
    labels_from_boxes,
    load_pseudo_labels,
    padding_cells,
    parse_heads,
    rpn_samples_from_pseudo,
    save_pseudo_labels,
    teacher_prompt,
    tri_state_labels,
)

SQUARE = (60, 60)  # an unpadded square original: no padding cells
I = IGNORE


def _map(cells: dict, value: float = 0.0) -> torch.Tensor:
    g = torch.full((6, 6), value)
    for (r, c), v in cells.items():
        g[r, c] = v
    return g


def test_fg_box_is_dilated_by_one_cell_and_inner_non_fg_cells_are_ignored():
    labels = tri_state_labels(_map({(2, 2): 1.0}), None, SQUARE)
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[1:4, 1:4] = I  # the blurred box around the single FG cell
    expected[2, 2] = 1
    assert torch.equal(labels, expected)


def test_without_blur_the_box_is_tight():
    labels = tri_state_labels(_map({(2, 2): 1.0}), None, SQUARE, blur=0)
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[2, 2] = 1
    assert torch.equal(labels, expected)


def test_mid_level_attention_outside_the_box_is_ignored_and_low_is_background():
    g = _map({(2, 2): 1.0, (5, 5): 0.1, (5, 0): 0.04})  # 0.1: between bg 0.05 and fg 0.25 of the peak
    labels = tri_state_labels(g, None, SQUARE)
    assert labels[5, 5] == I and labels[5, 0] == 0 and labels[2, 2] == 1


def test_fg_threshold_is_strictly_above_fg_ratio_times_peak():
    labels = tri_state_labels(_map({(2, 2): 1.0, (2, 3): 0.25, (3, 2): 0.26}), None, SQUARE)
    assert labels[3, 2] == 1 and labels[2, 3] == I  # 0.25 is not > 0.25; it lies inside the box


def test_sink_cells_are_never_foreground_and_become_background_outside_the_box():
    g = _map({(0, 0): 5.0, (3, 3): 1.0})
    sink = _map({(0, 0): 0.5})
    labels = tri_state_labels(g, sink, SQUARE)
    assert labels[0, 0] == 0 and labels[3, 3] == 1
    # Without the sink map the sink dominates: it becomes the only FG cell.
    unsunk = tri_state_labels(g, None, SQUARE)
    assert unsunk[0, 0] == 1 and unsunk[3, 3] != 1


def test_sink_threshold_is_inclusive():
    g = _map({(0, 0): 5.0, (3, 3): 1.0})
    assert tri_state_labels(g, _map({(0, 0): 1e-2}), SQUARE)[0, 0] == 0
    assert tri_state_labels(g, _map({(0, 0): 0.9e-2}), SQUARE)[0, 0] == 1


def test_padding_cells_of_a_wide_image_are_rows_and_always_background():
    pad = padding_cells((6, 6), (120, 60))  # content spans int(60/120*6) = 3 rows, centred: rows 1..3
    assert pad[:, 0].tolist() == [True, False, False, False, True, True] and pad.all(dim=1).tolist() == pad[:, 0].tolist()
    assert padding_cells((6, 6), (60, 120))[0].tolist() == [True, False, False, False, True, True]
    g = _map({(5, 3): 2.0, (2, 3): 1.0})  # strong attention on the grey padding
    labels = tri_state_labels(g, None, (120, 60))
    assert labels[5, 3] == 0 and labels[2, 3] == 1 and bool((labels[pad] == 0).all())
    assert tri_state_labels(g, None, (120, 60), pad_is_bg=False)[5, 3] == 1


def test_a_box_of_half_the_grid_or_more_drops_the_whole_sample():
    kept = tri_state_labels(_map({(2, 1): 1.0, (2, 2): 1.0, (2, 3): 1.0}), None, SQUARE)  # box 3x5 = 15 < 18
    assert (kept == 1).sum() == 3
    dropped = tri_state_labels(_map({(2, c): 1.0 for c in range(1, 5)}), None, SQUARE)  # box 3x6 = 18
    assert bool((dropped == I).all())
    assert bool((tri_state_labels(torch.ones(6, 6), None, SQUARE) == I).all())


def test_a_weak_peak_drops_the_whole_sample():
    assert bool((tri_state_labels(_map({(2, 2): 4e-3}), None, SQUARE) == I).all())
    assert tri_state_labels(_map({(2, 2): 6e-3}), None, SQUARE)[2, 2] == 1
    assert bool((tri_state_labels(torch.zeros(6, 6), None, SQUARE) == I).all())


def test_samples_whose_labels_are_all_ignored_are_dropped(tmp_path):
    good = PseudoLabel("a", 1, tmp_path / "a.png", "q", "x", "textual", SQUARE, _map({(2, 2): 1.0}), torch.zeros(6, 6))
    weak = PseudoLabel("b", 2, tmp_path / "b.png", "q", "x", "textual", SQUARE, _map({(2, 2): 1e-3}), torch.zeros(6, 6))
    samples, dropped = rpn_samples_from_pseudo(PseudoLabelSet({"token_budget": 36, "square_pad": True}, [good, weak]))
    assert [s.uid for s in samples] == ["a"] and dropped == 1 and samples[0].token_budget == 36
    samples, dropped = rpn_samples_from_pseudo(PseudoLabelSet({"token_budget": 36}, [good, weak]), min_peak=0.0)
    assert len(samples) == 2 and dropped == 0


def test_box_labels_mark_centre_cells_fg_partial_cells_ignored():
    labels = labels_from_boxes((50, 50, 250, 150), (4, 4), (400, 400), pad_square=False)
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0:2, 0:3] = I
    expected[0, 0] = expected[0, 1] = expected[1, 1] = 1  # centres inside + the cell of the box centre
    assert torch.equal(labels, expected)


def test_box_labels_can_mark_every_touched_cell_fg():
    labels = labels_from_boxes((50, 50, 250, 150), (4, 4), (400, 400), pad_square=False, touched="foreground")
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[0:2, 0:3] = 1  # the box overlaps rows 0-1, columns 0-2: the RoI must span them all to contain it
    assert torch.equal(labels, expected)
    with pytest.raises(InvalidInput, match="touched"):
        labels_from_boxes((50, 50, 250, 150), (4, 4), (400, 400), touched="all")


def test_a_tiny_box_gets_one_fg_cell_in_the_square_padded_frame():
    labels = labels_from_boxes((0, 0, 100, 100), (4, 4), (400, 200), pad_square=True)  # 100 px pad above
    assert labels[1, 0] == 1 and int((labels == 1).sum()) == 1 and int((labels == I).sum()) == 0
    several = labels_from_boxes([[0, 0, 10, 10], [390, 190, 400, 200]], (4, 4), (400, 200), pad_square=True)
    assert several[1, 0] == 1 and several[2, 3] == 1 and int((several == 1).sum()) == 2


def test_default_heads_use_the_paper_tables_then_the_heuristic():
    assert default_heads(28, 28).grounding == {22: (1, 4), 23: (6, 11)}
    assert default_heads(28, 28, "natural").sink == {9: (4, 22)}
    assert default_heads(36, 16, "natural").grounding == {21: (9, 11), 22: (0, 7)}
    tiny = default_heads(4, 4)
    assert tiny.grounding == {2: (0, 1, 2, 3), 3: (0, 1, 2, 3)} and tiny.sink == {}
    assert set(default_heads(64, 40).grounding) == set(range(38, 52))
    with pytest.raises(InvalidInput):
        default_heads(4, 4, "visual")


def test_parse_heads():
    assert parse_heads("20:1,4;22:14", 28, 28) == {20: (1, 4), 22: (14,)}
    assert parse_heads("", 28, 28) == {}
    for bad in ("20", "20:x", "28:1", "2:28"):
        with pytest.raises(InvalidInput):
            parse_heads(bad, 28, 28)


def test_teacher_prompt_modes():
    q = "What is written? Answer the question using a single word or phrase."
    assert teacher_prompt(q, "textual") == q
    assert teacher_prompt(q, "textual", short_prompt=False) == "What is written?"
    natural = teacher_prompt(q, "natural")
    assert natural.startswith("What is written?\n") and "x_min y_min x_max y_max" in natural
    assert "single word" not in natural


def test_pseudo_labels_round_trip_through_safetensors_and_json(tmp_path):
    image = tmp_path / "data" / "img.png"
    image.parent.mkdir()
    image.write_bytes(b"")
    g, s = torch.rand(6, 6), torch.rand(6, 6)
    labels = PseudoLabelSet({"token_budget": 36, "square_pad": True, "heads": {"2": [0]}},
                            [PseudoLabel("u", 3, image, "q?", "a", "textual", (80, 40), g, s)], {"short_answer": 2})
    out = save_pseudo_labels(labels, tmp_path / "labels")
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "labels.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    back = load_pseudo_labels(out)
    (sample,) = back.samples
    assert torch.equal(sample.grounding, g) and torch.equal(sample.sink, s)
    assert sample.image.resolve() == image.resolve() and sample.original_size == (80, 40)
    assert back.settings == labels.settings and back.dropped == {"short_answer": 2}
    with pytest.raises(InvalidInput, match="not a pseudo-label directory"):
        load_pseudo_labels(tmp_path)
    assert HeadSet({1: (0,)}, {0: (1,)}).layers() == {0, 1}

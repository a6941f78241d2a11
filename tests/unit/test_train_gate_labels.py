"""Stage-3 labelling rules on hand-made answer ladders: unstable, wrong at top, monotone, non-monotone, easy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from qzoom_service.errors import InvalidInput
from qzoom_service.train.gate_labels import (
    GateDataset,
    Ladder,
    LadderSet,
    answers_match,
    check_resolutions,
    classify,
    draw_label,
    load_ladders,
    normalize,
    save_ladders,
)

RES = (64, 128, 256, 576, 1024)


def ladder(answers, gt="red", uid="x") -> Ladder:
    return Ladder(uid, 1, Path("img.png"), "What colour?", gt, RES[: len(answers)], tuple(answers))


def test_normalize_and_containment_match():
    assert normalize("  The Red!  ") == "the red"
    assert answers_match("Red.", "red") and answers_match("it is red", "red") and answers_match("red", "dark red car")
    assert not answers_match("blue", "red")
    assert not answers_match("...", "red") and not answers_match("", "")  # empty never matches (our guard)
    assert answers_match("3.5", "3.5") and answers_match("3.5.", "3.5")


@pytest.mark.parametrize("answers,gt,kind", [
    (["red", "red", "red", "red", "blue"], "red", "unstable"),      # top two disagree
    (["blue", "red", "red", "Red", "red!"], "red", "hard"),          # case / punctuation do not matter
    (["blue", "blue", "blue", "blue", "blue"], "red", "wrong_at_top"),
    (["blue", "green", "red", "red", "red"], "red", "hard"),        # monotone: a prefix is wrong
    (["red", "blue", "red", "red", "red"], "red", "non_monotone"),  # right low, wrong higher
    (["red", "red", "red", "red", "red"], "red", "easy"),
    (["a red car", "red", "red", "red", "red"], "red", "easy"),     # containment counts as right
    (["blue", "blue", "cyan", "cyan", "cyan"], "blue", "wrong_at_top"),
])
def test_classify(answers, gt, kind):
    assert classify(ladder(answers, gt)) == kind


def test_easy_draws_a_non_top_resolution_with_label_zero():
    easy = ladder(["red"] * 5)
    draws = {draw_label(easy, random.Random(s)) for s in range(200)}
    assert draws == {(0, 0), (1, 0), (2, 0)}  # the top two (576, 1024) are the oracle, never inputs


def test_hard_positive_comes_from_the_last_two_wrong_resolutions():
    hard = ladder(["blue", "green", "blue", "red", "red"])
    draws = {draw_label(hard, random.Random(s), p_pos=1.0) for s in range(200)}
    assert draws == {(1, 1), (2, 1)}


def test_hard_negative_needs_a_right_answer_below_the_top():
    assert draw_label(ladder(["blue", "blue", "blue", "red", "red"]), random.Random(0), p_pos=0.0) == (None, -100)
    assert draw_label(ladder(["blue", "red", "red", "red", "red"]), random.Random(0), p_pos=0.0)[1] == 0
    assert {draw_label(ladder(["blue", "red", "red", "red", "red"]), random.Random(s), p_pos=0.0)[0]
            for s in range(100)} == {1, 2}


def test_hard_samples_are_positive_about_p_pos_of_the_time():
    hard = ladder(["blue", "red", "red", "red", "red"])
    labels = [draw_label(hard, random.Random(s))[1] for s in range(2000)]
    assert 0.87 < sum(labels) / len(labels) < 0.93


@pytest.mark.parametrize("answers", [["red", "red", "red", "red", "blue"], ["blue"] * 5, ["red", "blue", "red", "red", "red"]])
def test_dropped_kinds_are_always_ignored(answers):
    assert draw_label(ladder(answers), random.Random(0)) == (None, -100)


def test_dataset_balances_easy_to_hard_and_redraws_per_epoch_deterministically():
    hard = [ladder(["blue", "red", "red", "red", "red"], uid=f"h{i}") for i in range(3)]
    easy = [ladder(["red"] * 5, uid=f"e{i}") for i in range(10)]
    junk = [ladder(["red", "red", "red", "red", "blue"], uid="u"), ladder(["blue"] * 5, uid="w")]
    ds = GateDataset.from_ladders(hard + easy + junk, seed=3)
    assert ds.stats["hard"] == 3 and ds.stats["easy"] == 10 and ds.stats["kept"] == 6
    assert ds.stats["unstable"] == 1 and ds.stats["wrong_at_top"] == 1
    assert [x.uid for x in ds.items] == [x.uid for x in GateDataset.from_ladders(hard + easy + junk, seed=3).items]
    assert ds.draw(0) == GateDataset.from_ladders(hard + easy + junk, seed=3).draw(0)
    epochs = [[(x.uid, r, y) for x, r, y in ds.draw(e)] for e in range(6)]
    assert len({tuple(e) for e in epochs}) > 1  # labels/resolutions are re-drawn per epoch
    for x, r, y in ds.draw(0):
        assert r in RES[:3] and y in (0, 1) and (y == 0 or x.uid.startswith("h"))
    assert len(GateDataset.from_ladders(hard + easy, seed=3, max_samples=4).items) == 4
    assert GateDataset.from_ladders(easy, seed=0).items == []  # no hard sample -> no easy one either


def test_split_holds_out_a_seeded_fraction_and_keeps_the_rest():
    pool = [ladder(["blue", "red", "red", "red", "red"], uid=f"h{i}") for i in range(10)]
    ds = GateDataset.from_ladders(pool, seed=4, p_pos=0.7)
    train, held = ds.split(0.25)
    assert len(held.items) == 2 and len(train.items) == 8  # round(0.25 x 10) = 2 (half to even)
    assert sorted(x.uid for x in train.items + held.items) == sorted(x.uid for x in ds.items)
    assert held.p_pos == train.p_pos == 0.7 and held.seed == 4
    again, other = ds.split(0.25)[1], GateDataset.from_ladders(pool, seed=5).split(0.25)[1]
    assert [x.uid for x in again.items] == [x.uid for x in held.items]
    assert len({tuple(x.uid for x in d.items) for d in (held, other)}) == 2  # another seed, another draw
    assert ds.split(0.0)[1].items == []
    with pytest.raises(InvalidInput, match="held-out fraction"):
        ds.split(1.0)


def test_resolutions_must_be_explicit_and_ascending():
    assert check_resolutions([64, 128, 256]) == (64, 128, 256)
    for bad in ([64, 128], [128, 64, 256], [64, 64, 256], [0, 64, 128]):
        with pytest.raises(InvalidInput):
            check_resolutions(bad)


def test_ladders_round_trip_and_reject_mismatched_rows(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    lad = Ladder("u", 4, tmp_path / "img.png", "q", "red", RES, ("a", "b", "c", "d", "e"))
    out = save_ladders(LadderSet({"resolutions": list(RES), "prompt_suffix": "\nShort."}, [lad]), tmp_path / "lad")
    back = load_ladders(out)
    assert back.ladders[0].answers == lad.answers and back.ladders[0].image.resolve() == lad.image.resolve()
    assert GateDataset.from_ladders(back).prompt_suffix == "\nShort."
    doc = json.loads((out / "ladders.json").read_text())
    doc["samples"][0]["answers"].pop()
    (out / "ladders.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidInput, match="sample 1: 5 resolutions but 4 answers"):
        load_ladders(out)

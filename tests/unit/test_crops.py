"""Crop handles without Ray or Redis: boxes in every space, crops of crops, the per-image quota, the baseline."""

from __future__ import annotations

import threading

import pytest

from qzoom_service import crops
from qzoom_service.cache import InProcessCache
from qzoom_service.errors import InvalidInput, LimitExceeded, NotFound

IMAGE = "ab" * 32
SIZE, INPUT = (640, 480), (448, 336)
FACTOR = 28  # Qwen2.5-VL: 14 px patches, 2x2 merge


@pytest.fixture
def store():
    return InProcessCache()


def test_a_box_in_each_space_maps_to_the_same_original_pixels(store):
    expected = (320, 240, 640, 480)
    for box, space in (((320, 240, 640, 480), "original"), ((500, 500, 1000, 1000), "norm1000"),
                       ((0.5, 0.5, 1.0, 1.0), "norm1"), ((224, 168, 448, 336), "input")):
        assert crops.crop_box(store, IMAGE, SIZE, INPUT, box, space, FACTOR) == expected, space


def test_a_box_is_clamped_grown_and_float_noise_is_snapped(store):
    assert crops.crop_box(store, IMAGE, SIZE, INPUT, (500, 400, 800, 700), "original", FACTOR) == (500, 400, 640, 480)
    x1, y1, x2, y2 = crops.crop_box(store, IMAGE, SIZE, INPUT, (100, 100, 105, 104), "original", FACTOR)
    assert (x2 - x1, y2 - y1) == (FACTOR, FACTOR)
    # 500 of 1000 on 480 px is 239.99999999999997 in floats: the crop still ends at row 240.
    assert crops.crop_box(store, IMAGE, SIZE, INPUT, (0, 0, 500, 500), "norm1000", FACTOR) == (0, 0, 320, 240)


@pytest.mark.parametrize("box,text", [((300, 10, 100, 90), "inverted"), ((10, 10, 10, 90), "empty"),
                                      ((float("nan"), 0, 5, 5), "finite"), ((700, 500, 900, 600), "outside"),
                                      ((0, 0, 1), "4 numbers")])
def test_bad_boxes_are_invalid_input(store, box, text):
    with pytest.raises(InvalidInput, match=text):
        crops.crop_box(store, IMAGE, SIZE, INPUT, box, "original", FACTOR)


def test_a_box_inside_a_crop_maps_through_it_and_stays_inside_it(store):
    outer = crops.crop_box(store, IMAGE, SIZE, INPUT, (0.5, 0.5, 1, 1), "norm1", FACTOR)
    crop_id = crops.remember_crop(store, IMAGE, outer, limit=8)
    inner = crops.crop_box(store, IMAGE, SIZE, INPUT, (0, 0, 500, 500), "norm1000", FACTOR, crop_id=crop_id)
    assert inner == (320, 240, 480, 360)
    past = crops.crop_box(store, IMAGE, SIZE, INPUT, (100, 100, 900, 900), "original", FACTOR, crop_id=crop_id)
    assert past == (420, 340, 640, 480)  # clipped to the crop, not to the image beyond it


def test_crop_handles_refuse_another_image_input_space_and_unknown_ids(store):
    crop_id = crops.remember_crop(store, IMAGE, (0, 0, 100, 100), limit=8)
    with pytest.raises(InvalidInput, match="belongs to another image"):
        crops.crop_box(store, "cd" * 32, SIZE, INPUT, (0, 0, 1, 1), "norm1", FACTOR, crop_id=crop_id)
    with pytest.raises(InvalidInput, match="COORD_SPACE_INPUT is not defined for crops"):
        crops.crop_box(store, IMAGE, SIZE, INPUT, (0, 0, 10, 10), "input", FACTOR, crop_id=crop_id)
    with pytest.raises(NotFound, match="unknown crop_id"):
        crops.crop_box(store, IMAGE, SIZE, INPUT, (0, 0, 1, 1), "norm1", FACTOR, crop_id="crop-" + "0" * 24)


@pytest.mark.parametrize("crop_id", ["crop-nope", "crop-" + "0" * 23, "CROP-" + "a" * 24, "crop-" + "A" * 24,
                                     "crops:" + IMAGE, "crop-" + "0" * 24 + "\n", IMAGE])
def test_a_string_that_is_no_crop_handle_is_refused_before_any_lookup(store, crop_id):
    with pytest.raises(InvalidInput, match="not a crop handle"):
        crops.crop_box(store, IMAGE, SIZE, INPUT, (0, 0, 1, 1), "norm1", FACTOR, crop_id=crop_id)


def test_crop_records_live_apart_from_other_blobs(store):
    # A blob stored under a crop handle's own name is not read as that crop's record.
    crop_id = crops.crop_id_for(IMAGE, (0, 0, 100, 100))
    store.put_blob(crop_id, b"[1, 2]")
    with pytest.raises(NotFound, match="unknown crop_id"):
        crops.crop_box(store, IMAGE, SIZE, INPUT, (0, 0, 1, 1), "norm1", FACTOR, crop_id=crop_id)
    assert crops.remember_crop(store, IMAGE, (0, 0, 100, 100), limit=8) == crop_id
    assert crops.crop_box(store, IMAGE, SIZE, INPUT, (0, 0, 1, 1), "norm1", FACTOR, crop_id=crop_id) == (0, 0, 100, 100)


@pytest.mark.parametrize("space,box", [("norm1", (0, 0, 1e308, 1)), ("norm1", (-1e308, 0, 1, 1)),
                                       ("input", (0, 0, 1.7e308, 10))])  # input: 448 of 640 px, x / 0.7
def test_boxes_that_overflow_once_converted_are_invalid_input(store, space, box):
    with pytest.raises(InvalidInput, match="finite once converted to original pixels"):
        crops.crop_box(store, IMAGE, SIZE, INPUT, box, space, FACTOR)


def test_huge_finite_boxes_are_clamped_to_the_image(store):
    assert crops.crop_box(store, IMAGE, SIZE, INPUT, (-1e308, 0, 1e308, 480), "original", FACTOR) == (0, 0, 640, 480)
    assert crops.crop_box(store, IMAGE, SIZE, INPUT, (0, 0, 1e308, 1e308), "norm1000", FACTOR) == (0, 0, 640, 480)


def test_a_box_relative_to_a_crop_that_overflows_is_invalid_input(store):
    crop_id = crops.remember_crop(store, IMAGE, (0, 0, 100, 100), limit=8)
    with pytest.raises(InvalidInput, match="finite once converted to original pixels"):
        crops.crop_box(store, IMAGE, SIZE, INPUT, (1e307, 0, 1e308, 1), "norm1", FACTOR, crop_id=crop_id)
    with pytest.raises(InvalidInput, match="empty or inverted once converted"):  # starts past the crop's end
        crops.crop_box(store, IMAGE, SIZE, INPUT, (1e300, 0, 1e308, 10), "original", FACTOR, crop_id=crop_id)


def test_the_same_crop_gets_the_same_handle_and_is_not_counted_twice(store):
    first = crops.remember_crop(store, IMAGE, (0, 0, 60, 60), limit=2)
    assert crops.remember_crop(store, IMAGE, (0, 0, 60, 60), limit=2) == first
    second = crops.remember_crop(store, IMAGE, (10, 0, 70, 60), limit=2)
    assert second != first and second.startswith("crop-")
    with pytest.raises(LimitExceeded, match="limit is 2.*existing crop_id"):
        crops.remember_crop(store, IMAGE, (20, 0, 80, 60), limit=2)
    assert crops.remember_crop(store, IMAGE, (10, 0, 70, 60), limit=2) == second  # still usable
    assert crops.remember_crop(store, "cd" * 32, (20, 0, 80, 60), limit=2)  # other images count apart


def test_concurrent_new_crops_never_pass_the_quota(store):
    barrier = threading.Barrier(8)
    outcomes = []

    def work(t):
        barrier.wait()
        for i in range(5):
            try:
                outcomes.append(crops.remember_crop(store, IMAGE, (t * 10 + i, 0, t * 10 + i + 30, 30), limit=12))
            except LimitExceeded:
                outcomes.append(None)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stored = [c for c in outcomes if c is not None]
    assert len(stored) == 12 and len(set(stored)) == 12
    for c in stored:  # every handle granted is usable: its record was stored
        crops.box_in_crop(store, c, IMAGE, (0, 0, 1, 1), "norm1")


@pytest.mark.parametrize("size,factor,tokens", [((640, 480), 28, 23 * 17), ((28, 28), 28, 4),
                                                ((20000, 20000), 28, 127 * 127), ((640, 480), 32, 20 * 15)])
def test_baseline_tokens_are_the_full_resolution_grid_of_the_models_factor(size, factor, tokens):
    # 20000 px squared is capped at 16384 tokens: the largest square grid under it is 127 x 127.
    assert crops.baseline_tokens(size, factor) == tokens

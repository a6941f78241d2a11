"""Property tests for map -> box and coordinate conversions (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qzoom_client.coords import SPACES, from_original, smart_resize, to_original
from qzoom_service import rpn

FACTOR = 28  # Qwen2.5-VL's merged-token side (14 px patches, 2x2 merge)
sizes = st.tuples(st.integers(28, 5000), st.integers(28, 5000))
budgets = st.tuples(st.integers(4, 1024), st.integers(1, 3000)).map(
    lambda t: (t[0] * FACTOR**2, (t[0] + t[1]) * FACTOR**2))


@st.composite
def maps(draw):
    factor = draw(st.sampled_from([FACTOR, 32]))  # 32: Qwen3-VL's 16 px patches
    (w0, h0), (lo, hi) = draw(sizes), draw(budgets)
    rh, rw = smart_resize(h0, w0, lo, hi, factor)
    hm, wm = rh // factor, rw // factor
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    prob = torch.rand(hm, wm, generator=gen) ** draw(st.sampled_from([1.0, 4.0, 16.0]))
    return (w0, h0), prob, draw(st.floats(0.05, 0.95)), factor


@settings(max_examples=300, deadline=None)
@given(maps())
def test_box_is_inside_the_image_has_one_token_sides_and_covers_every_foreground_cell(case):
    (w0, h0), prob, threshold, factor = case
    fg = rpn.foreground_cells(prob, threshold)
    cell_box, box = rpn.map_to_box(prob, threshold, (w0, h0), factor=factor)
    if not bool(fg.any()):
        assert box is None and cell_box is None
        return
    x1, y1, x2, y2 = box
    assert all(isinstance(v, int) for v in box)
    assert 0 <= x1 < x2 <= w0 and 0 <= y1 < y2 <= h0
    assert x2 - x1 >= min(factor, w0) and y2 - y1 >= min(factor, h0)
    hm, wm = prob.shape
    sx, sy = w0 / wm, h0 / hm  # original pixels per merged cell
    # float32 arithmetic + truncation, as in the reference, may end the box 1 px short of a cell edge
    for r, c in fg.nonzero().tolist():
        assert x1 <= c * sx + 1e-3 and math.floor((c + 1) * sx) - 1 <= x2
        assert y1 <= r * sy + 1e-3 and math.floor((r + 1) * sy) - 1 <= y2


@settings(max_examples=300, deadline=None)
@given(sizes, budgets, st.tuples(*[st.floats(0, 1)] * 4), st.sampled_from(SPACES), st.sampled_from(SPACES))
def test_coordinate_conversions_round_trip(size, budget, frac, space_a, space_b):
    w0, h0 = size
    rh, rw = smart_resize(h0, w0, *budget, FACTOR)
    box = (frac[0] * w0, frac[1] * h0, frac[2] * w0, frac[3] * h0)
    a = from_original(box, space_a, size, (rw, rh))
    b = from_original(to_original(a, space_a, size, (rw, rh)), space_b, size, (rw, rh))
    back = to_original(b, space_b, size, (rw, rh))
    for u, v in zip(box, back):
        assert abs(u - v) <= 1e-6 * max(w0, h0)


def test_known_values_in_every_space():
    size, input_size = (2000, 1000), (1008, 504)
    box = (500, 250, 1000, 500)
    assert from_original(box, "norm1000", size) == [250, 250, 500, 500]
    assert from_original(box, "norm1", size) == [0.25, 0.25, 0.5, 0.5]
    assert from_original(box, "input", size, input_size) == [252, 126, 504, 252]


def test_sink_mask_only_for_grids_above_256_cells():
    assert torch.all(rpn.sink_mask(16, 16) == 1)
    m = rpn.sink_mask(18, 24)
    assert m[:4, 0].sum() == 0 and m[0, :6].sum() == 0 and m[4, 0] == 1 and m[0, 6] == 1 and m.sum() == 18 * 24 - 9


def test_blur_matches_separable_gaussian_with_reflect_padding():
    x = torch.zeros(5, 5)
    x[2, 2] = 1.0
    k = torch.exp(-0.5 * torch.tensor([1.0, 0.0, 1.0]))
    k = k / k.sum()
    torch.testing.assert_close(rpn.blur3(x)[1:4, 1:4], k[:, None] * k[None, :])
    corner = torch.zeros(3, 3)
    corner[0, 0] = 1.0  # reflect padding mirrors without repeating the edge: nothing leaks back
    assert abs(rpn.blur3(corner)[0, 0].item() - (k[1] * k[1]).item()) < 1e-6


@pytest.mark.parametrize("factor,expected", [(28, (28, 0, 56, 28)), (32, (24, 0, 56, 32))])
def test_single_cell_box_grows_to_one_token_and_slides_inside(factor, expected):
    prob = torch.zeros(4, 4)
    prob[0, 3] = 1.0
    cell_box, box = rpn.map_to_box(prob, 0.15, (56, 56), factor=factor)  # 14 px per cell: one cell is too small
    assert cell_box == (3, 0, 4, 1)
    assert box == expected


def test_explicit_zoom_boxes_are_clamped_grown_and_checked():
    from qzoom_service.errors import InvalidInput
    from qzoom_service.geometry import fit_crop_box

    assert fit_crop_box((-50, -10, 300.4, 250.6), (640, 480), min_side=FACTOR) == (0, 0, 300, 251)
    # grown to one token (28 px), slid inside
    assert fit_crop_box((630, 100, 700, 110), (640, 480), min_side=FACTOR) == (612, 91, 640, 119)
    with pytest.raises(InvalidInput, match="lies outside the 640x480 image"):
        fit_crop_box((700, 10, 800, 90), (640, 480), min_side=FACTOR)
    with pytest.raises(InvalidInput, match="aspect ratio of 207; the limit is 200"):
        fit_crop_box((0, 0, 5800, 28), (6000, 100), min_side=FACTOR)

"""Both RoI position schemes on a worked example (7B prompt, coarse grid 36x48, a 14x14 RoI), and the
standard scheme against stock `get_rope_index` on a real two-image sequence."""

from __future__ import annotations

import torch

from qzoom_service.coarse import rope_positions
from qzoom_service.zoom import zoom_positions

S, HM, WM = 15, 18, 24  # image start, coarse merged grid (7B default prompt, 1008x672 input)
NV, E = HM * WM, 15 + 24  # visual tokens; position of the coarse <|vision_end|>
BOX = (5, 3, 11, 9)  # merged-grid box (x0, y0, x1, y1), end exclusive
ROI = (14, 14)  # RoI merged grid (hm, wm)
TAIL = 3  # question tokens after the coarse image


def _coarse_positions() -> torch.Tensor:
    text = torch.arange(S).expand(3, -1)
    r, c = torch.meshgrid(torch.arange(HM), torch.arange(WM), indexing="ij")
    image = torch.stack([torch.full((NV,), S), S + r.flatten(), S + c.flatten()])
    after = (E + torch.arange(TAIL + 1)).expand(3, -1)  # <|vision_end|> at E, then the question
    return torch.cat([text, image, after], dim=1)


def test_reuse_scheme_interpolates_over_the_box_coarse_coordinates():
    pos = zoom_positions(_coarse_positions(), S, (HM, WM), ROI, BOX, reuse_src_pos=True)
    end = S + NV
    assert pos.dtype == torch.float32
    assert pos.shape[1] == S + NV + 1 + 1 + 196 + 1 + TAIL
    assert torch.equal(pos[:, : end + 1], _coarse_positions()[:, : end + 1].float())  # prefix unchanged
    assert pos[:, end + 1].tolist() == [40.0, 40.0, 40.0]  # RoI <|vision_start|> = E + 1
    roi = pos[:, end + 2 : end + 2 + 196].view(3, 14, 14)
    assert torch.all(roi[0] == 41)  # t = E + 2
    torch.testing.assert_close(roi[1, :, 0], torch.linspace(18, 23, 14))  # h over rows 3..8
    torch.testing.assert_close(roi[2, 0, :], torch.linspace(20, 25, 14))  # w over cols 5..10
    assert roi[1, 0, 0] == 18 and roi[1, -1, 0] == 23 and roi[2, 0, -1] == 25  # corner aligned
    assert abs(roi[1, 1, 0].item() - (18 + 5 / 13)) < 1e-5  # fractional, not rounded
    assert pos[:, end + 198].tolist() == [55.0, 55.0, 55.0]  # RoI <|vision_end|> = E + 14 + 2
    assert pos[0, end + 199 :].tolist() == [56.0, 57.0, 58.0]  # the question moved from 40 to 56


def test_standard_scheme_places_the_roi_as_a_second_image():
    pos = zoom_positions(_coarse_positions(), S, (HM, WM), ROI, BOX, reuse_src_pos=False)
    end = S + NV
    assert pos.dtype == torch.long
    roi = pos[:, end + 2 : end + 2 + 196].view(3, 14, 14)
    assert torch.all(roi[0] == 41)
    assert roi[1, :, 0].tolist() == list(range(41, 55)) and roi[2, 0, :].tolist() == list(range(41, 55))
    assert pos[:, end + 198].tolist() == [55, 55, 55]
    assert pos[0, end + 199 :].tolist() == [56, 57, 58]


def test_standard_scheme_equals_stock_rope_index_of_a_two_image_prompt(engine):
    """Build the fused ids [.. coarse .. RoI .. question] and ask transformers for its positions."""
    cfg = engine.model.config
    vs, ve, pad = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id
    hm, wm = 5, 3  # non-square RoI: the text advance is max(hm, wm)
    coarse = [1, 2, vs] + [pad] * (HM * WM) + [ve]
    ids = torch.tensor([coarse + [4, 5, 6]])
    fused = torch.tensor([coarse + [vs] + [pad] * (hm * wm) + [ve] + [4, 5, 6]])
    grid = torch.tensor([[1, 2 * HM, 2 * WM]])
    base = rope_positions(engine.model, ids, grid)[:, 0]
    expected = rope_positions(engine.model, fused, torch.tensor([[1, 2 * HM, 2 * WM], [1, 2 * hm, 2 * wm]]))[:, 0]
    ours = zoom_positions(base, 3, (HM, WM), (hm, wm), (0, 0, 2, 2), reuse_src_pos=False)
    assert torch.equal(ours, expected)

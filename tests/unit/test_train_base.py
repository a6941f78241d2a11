"""Base-model training (train/base.py): the training sequences are the engine's, padding does not leak,
and a step lowers the loss."""

from __future__ import annotations

import json

import pytest
import torch

from qzoom_service.synthetic import make_sample
from qzoom_service.coarse import encode_images, prefill_to_k
from qzoom_service.config import RequestOptions
from qzoom_service.model import load_model
from qzoom_service.released import CheckpointConfig
from qzoom_service.rpn import cell_box_to_original, original_to_cell_box
from qzoom_service.tiny import build_tiny
from qzoom_service.train.base import (BoxLocator, _sequence, _vision, batch_loss, drop_branch_keys, make_example,
                                      save_base, train_base)
from qzoom_service.train.loop import TrainConfig, lr_factor
from qzoom_service.types import Prepared
from qzoom_service.zoom import build_zoom_input

BUDGET = 64


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(seed=3)
    del model.qzoom
    return model, processor


@pytest.fixture(scope="module")
def samples():
    fine = make_sample("hr", 5, 0, fine_fraction=1.0, width=672, height=504, glyph_height=12)
    coarse = make_sample("doc", 5, 1, fine_fraction=0.0, width=448, height=576, glyph_height=12)
    return fine, coarse


def test_fused_example_crops_the_cells_around_the_target(tiny, samples):
    _, processor = tiny
    fine, _ = samples
    ex = make_example(processor, fine.image, fine.question, fine.answer, BUDGET, fine.target_box)
    hw = (int(ex.grid_thw[0, 1]) // 2, int(ex.grid_thw[0, 2]) // 2)
    box = cell_box_to_original(ex.crop[2], hw, fine.image.size, factor=processor.factor)
    t = fine.target_box
    assert box[0] <= t[0] and box[1] <= t[1] and t[2] <= box[2] and t[3] <= box[3]
    # Re-encoded at the coarse budget: the crop gets about as many tokens as the whole coarse view.
    assert abs(int(ex.crop[1].prod()) - int(ex.grid_thw.prod())) <= 0.35 * int(ex.grid_thw.prod())
    answer = processor.tokenizer.decode(ex.input_ids[-ex.answer_len:])
    assert answer == fine.answer + "<|im_end|>"


@pytest.mark.parametrize("reuse_src_pos", [True, False])
def test_training_sequence_is_the_engines_fused_sequence(tiny, samples, reuse_src_pos):
    """Prefix of the training sequence (everything before the answer) == the engine's zoom input."""
    model, processor = tiny
    fine, _ = samples
    ex = make_example(processor, fine.image, fine.question, fine.answer, BUDGET, fine.target_box)
    with torch.no_grad():
        coarse, roi = _vision(model, [ex])
        embeds, positions = _sequence(model, ex, coarse[0], roi[0], reuse_src_pos)
    prompt_ids = ex.input_ids[: -ex.answer_len][None]
    pixels = BUDGET * processor.factor**2
    prepared = Prepared(fine.image, prompt_ids, ex.pixel_values, ex.grid_thw,
                        RequestOptions(min_pixels=pixels, max_pixels=pixels), processor.patch_size,
                        processor.merge_size)
    (coarse_embeds,) = encode_images(model, ex.pixel_values, ex.grid_thw)
    (roi_embeds,) = encode_images(model, ex.crop[0], ex.crop[1])
    state = prefill_to_k(model, prepared, coarse_embeds, 1)
    hw = prepared.merged_hw
    roi_hw = (int(ex.crop[1][0, 1]) // 2, int(ex.crop[1][0, 2]) // 2)
    zin = build_zoom_input(state, roi_embeds, hw, roi_hw, ex.crop[2], reuse_src_pos)
    n = zin.embeds.shape[1]
    assert embeds.shape[0] == n + ex.answer_len
    torch.testing.assert_close(embeds[:n], zin.embeds[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(positions[:, :n], zin.positions[:, 0].float())


def test_right_padding_does_not_leak_into_the_loss(tiny, samples):
    """The batch loss is the token-weighted mean of the per-sample losses: padding changes nothing."""
    model, processor = tiny
    fine, coarse = samples
    a = make_example(processor, fine.image, fine.question, fine.answer, BUDGET, fine.target_box)
    b = make_example(processor, coarse.image, coarse.question, coarse.answer, BUDGET)
    assert a.input_ids.shape[0] != b.input_ids.shape[0]
    with torch.no_grad():
        both, _ = batch_loss(model, [a, b], True)
        la, _ = batch_loss(model, [a], True)
        lb, _ = batch_loss(model, [b], True)
    expected = (la * a.answer_len + lb * b.answer_len) / (a.answer_len + b.answer_len)
    torch.testing.assert_close(both, expected, rtol=1e-4, atol=1e-5)


def test_training_steps_lower_the_loss_on_a_fixed_batch(samples, tmp_path):
    model, processor = build_tiny(seed=4)
    del model.qzoom
    from qzoom_service.heads import QZoomBranches
    from qzoom_service.model import LoadedModel

    loaded = LoadedModel(model, processor, QZoomBranches.create(model.config.text_config), "t", "0",
                         CheckpointConfig(reuse_src_pos=True))
    fine, coarse = samples
    fixed = [make_example(processor, fine.image, fine.question, fine.answer, BUDGET, fine.target_box),
             make_example(processor, coarse.image, coarse.question, coarse.answer, BUDGET)]
    with torch.no_grad():
        before, _ = batch_loss(model, fixed, True)
    seen = []
    losses = train_base(loaded, lambda i, rng: fixed[i], TrainConfig(lr=3e-3, batch_size=2, steps=8, warmup=0.0),
                        pool=2, out_dir=tmp_path / "run", callback=lambda step, loss, exact: seen.append(step))
    with torch.no_grad():
        after, _ = batch_loss(model, fixed, True)
    assert seen == list(range(1, 9)) and len(losses) == 8
    assert float(after) < 0.7 * float(before)
    assert not any(p.requires_grad for p in model.parameters())  # left frozen for the stages that follow


def test_stop_at_ends_base_training_with_a_checkpoint_on_the_full_schedule(samples, tmp_path):
    loaded = _loaded_tiny(7)
    fine, coarse = samples
    fixed = [make_example(loaded.processor, fine.image, fine.question, fine.answer, BUDGET, fine.target_box),
             make_example(loaded.processor, coarse.image, coarse.question, coarse.answer, BUDGET)]
    config = TrainConfig(lr=3e-3, batch_size=2, steps=8, warmup=0.25, save_every=100)
    seen = []
    losses = train_base(loaded, lambda i, rng: fixed[i], config, pool=2, out_dir=tmp_path / "run", stop_at=3,
                        callback=lambda step, loss, exact: seen.append(step))
    assert seen == [1, 2, 3] and len(losses) == 3
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "state.json").is_file()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([3e-3 * lr_factor(s, 8, 0.25) for s in range(3)])


def test_locate_box_marks_exactly_the_cells_the_target_touches(tiny, samples):
    _, processor = tiny
    fine, _ = samples
    plain = make_example(processor, fine.image, fine.question, fine.answer, BUDGET, fine.target_box)
    assert plain.target_cells is None
    ex = make_example(processor, fine.image, fine.question, fine.answer, BUDGET, fine.target_box,
                      locate_box=fine.target_box)
    hw = (int(ex.grid_thw[0, 1]) // 2, int(ex.grid_thw[0, 2]) // 2)
    x0, y0, x1, y1 = original_to_cell_box(fine.target_box, hw, fine.image.size)
    expected = torch.zeros(hw)
    expected[y0:y1, x0:x1] = 1.0
    assert torch.equal(ex.target_cells.view(hw), expected)
    assert int((ex.input_ids == processor.token_id("<|image_pad|>")).sum()) == ex.target_cells.numel()


def _loaded_tiny(seed):
    from qzoom_service.heads import QZoomBranches
    from qzoom_service.model import LoadedModel

    model, processor = build_tiny(seed=seed)
    del model.qzoom
    return LoadedModel(model, processor, QZoomBranches.create(model.config.text_config), "t", "0",
                         CheckpointConfig(reuse_src_pos=True))


def test_locator_loss_joins_the_answer_loss_and_training_lowers_it(samples, tmp_path):
    loaded = _loaded_tiny(6)
    model, processor = loaded.model, loaded.processor
    fine, coarse = samples
    fixed = [make_example(processor, fine.image, fine.question, fine.answer, BUDGET, fine.target_box,
                          locate_box=fine.target_box),
             make_example(processor, coarse.image, coarse.question, coarse.answer, BUDGET)]  # no cells: skipped
    locator = BoxLocator(model.config.text_config.hidden_size, layer=2, weight=0.5, pos_weight=10.0)
    with torch.no_grad():
        answer_only, _ = batch_loss(model, fixed, True)
        both, _ = batch_loss(model, fixed, True, locator)
    before = locator.last["loss"]
    torch.testing.assert_close(float(both), float(answer_only) + 0.5 * before, rtol=1e-5, atol=1e-6)
    train_base(loaded, lambda i, rng: fixed[i], TrainConfig(lr=3e-3, batch_size=2, steps=8, warmup=0.0), pool=2,
               out_dir=tmp_path / "run", locator=locator)
    with torch.no_grad():
        batch_loss(model, fixed, True, locator)
    assert locator.last["loss"] < 0.7 * before
    assert not any(p.requires_grad for p in model.parameters())


def test_examples_are_reproducible_per_index(tiny):
    _, processor = tiny
    calls = []

    def example_for(i, rng):
        calls.append((i, rng.random()))
        return None

    from qzoom_service.train.base import _Examples

    examples = _Examples(example_for, [[0, 1]], seed=9, workers=0)
    examples([0, 1])
    examples([0, 1])
    assert calls[:2] == calls[2:]
    assert calls[0][1] != calls[1][1]


def test_saved_base_loads_as_plain_weights(tiny, tmp_path):
    model, processor = build_tiny(seed=5)
    from qzoom_service.heads import QZoomBranches
    from qzoom_service.model import LoadedModel

    del model.qzoom
    loaded = LoadedModel(model, processor, QZoomBranches.create(model.config.text_config), "t", "0",
                         CheckpointConfig(reuse_src_pos=True))
    out = save_base(loaded, tmp_path / "base")
    cfg = json.loads((out / "config.json").read_text())
    assert "twig_K" not in cfg and "enable_high_res" not in cfg
    back = load_model(str(out))
    assert not back.branches.has_rpn and not back.branches.has_gate
    torch.testing.assert_close(back.model.lm_head.weight, model.lm_head.weight)


def test_drop_branch_keys_also_cleans_text_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"twig_K": 2, "keep": 1, "text_config": {"high_res_K": 2, "hidden_size": 8}}))
    drop_branch_keys(path)
    assert json.loads(path.read_text()) == {"keep": 1, "text_config": {"hidden_size": 8}}


def test_workers_build_the_same_examples_in_plan_order_from_a_resumed_position():
    from qzoom_service.train.base import BaseExample, _Examples

    def example_for(i, rng):
        crop = (torch.full((2, 3), rng.random()), torch.tensor([[1, 2, 2]]), (0, 0, 1, 1)) if i % 2 else None
        cells = torch.full((3,), float(i)) if i % 3 else None
        return BaseExample(torch.full((4, 3), rng.random()), torch.tensor([[1, 2, 2]]), torch.tensor([i, 7]), 1, crop,
                           cells)

    def plain(examples):
        return [(ex.pixel_values.tolist(), ex.input_ids.tolist(), ex.crop and ex.crop[0].tolist(),
                 ex.target_cells is None or ex.target_cells.tolist()) for ex in examples]

    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    inline = _Examples(example_for, batches, seed=3, workers=0)
    ahead = _Examples(example_for, batches, seed=3, workers=1, ahead=2)
    try:
        # Start at batch 1, as a resumed run does; the read-ahead window never exceeds `ahead`.
        got = []
        for b in batches[1:]:
            got.append(plain(ahead(b)))
            assert len(ahead.pending) <= 2
    finally:
        ahead.close()
    assert got == [plain(inline(b)) for b in batches[1:]]
    with pytest.raises(RuntimeError, match="order"):
        fresh = _Examples(example_for, batches, seed=3, workers=1)
        try:
            fresh(batches[0])
            fresh(batches[2])
        finally:
            fresh.close()

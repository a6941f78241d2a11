"""Training both branches on the tiny model: loss goes down, only the trained branch moves, the result
loads like an official checkpoint, runs resume exactly, and a killed save never looks complete."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qzoom_service.synthetic import generate, write_dataset
from qzoom_service.coarse import causal_mask
from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine
from qzoom_service.errors import CheckpointError, InvalidInput
from qzoom_service.heads import last_token_qk
from qzoom_service.model import load_model
from qzoom_service.train import checkpoint as ckpt_mod
from qzoom_service.train.checkpoint import latest_checkpoint
from qzoom_service.train.data import load_records, open_image
from qzoom_service.train.gate_labels import GateDataset, Ladder
from qzoom_service.train.inputs import encode_at_budget, square_pad, trunk_state
from qzoom_service.train.loop import TrainConfig
from qzoom_service.train.rpn_labels import make_pseudo_labels, rpn_samples_from_boxes
from qzoom_service.train.teacher import answer_attention
from qzoom_service.train.train_heads import (
    _rpn_batch,
    evaluate_gate,
    evaluate_rpn,
    gate_logit,
    rpn_map,
    train_gate,
    train_rpn,
    training_branches,
)
from qzoom_service.types import Request

from ..helpers import TINY_BUDGET

BUDGET = 36  # 6x6 merged tokens: quick on CPU
ONE_STEP = TrainConfig(lr=1e-3, batch_size=64, steps=1, warmup=0.0)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-data")
    return load_records(write_dataset(generate("hr", 4, seed=5, width=448, height=336), out))


@pytest.fixture(scope="module")
def rpn_samples(records):
    return rpn_samples_from_boxes(records, factor=28, token_budget=BUDGET)


@pytest.fixture(scope="module")
def gate_data(records):
    res = (16, 25, 36, 49)
    ladders = []
    for i, r in enumerate(records):
        answers = ["nope", r.answer, r.answer, r.answer] if i % 2 else [r.answer] * 4  # hard / easy
        ladders.append(Ladder(r.uid, r.row, r.image, r.question, r.answer, res, tuple(answers)))
    return GateDataset.from_ladders(ladders, seed=0)


def _params(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict, prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in keys)


def test_fresh_rpn_branch_reproduces_base_eager_attention_at_layer_k_plus_t_minus_1(tiny_checkpoint, records):
    loaded = load_model(str(tiny_checkpoint), attn_implementation="eager")
    k, t = 2, 2
    branches = training_branches(loaded, "twig", k, t)  # copies of base layers 2 and 3
    p = encode_at_budget(loaded.processor, _image(records[0]), records[0].question, BUDGET)
    types = (p.input_ids == loaded.model.config.image_token_id).int()
    with torch.no_grad():
        out = loaded.model(input_ids=p.input_ids, pixel_values=p.pixel_values, image_grid_thw=p.grid_thw,
                           mm_token_type_ids=types, output_attentions=True, output_hidden_states=True)
        base = out.attentions[k + t - 1][0, :, -1]  # (H, L)
        state = trunk_state(loaded.model, p, k)
        assert torch.equal(state.h_k, out.hidden_states[k])  # our no-grad trunk is the stock prefix
        h = branches.rpn_layers[0](state.h_k, attention_mask=_mask(state), position_embeddings=state.position_embeddings)
        mine = torch.softmax(last_token_qk(branches.rpn_layers[-1], h, state.position_embeddings), dim=-1)
        assert torch.allclose(mine, base, atol=1e-6, rtol=0)
        shifted = torch.softmax(last_token_qk(branches.rpn_layers[0], state.h_k, state.position_embeddings), -1)
        assert not torch.allclose(shifted, base, atol=1e-3)  # the layer-K copy does not: the check discriminates


def _image(item):
    return open_image(item.image, str(item.image))


def _mask(state):
    n = state.h_k.shape[1]
    return causal_mask(n, n, state.h_k.dtype, state.h_k.device)


def test_teacher_forced_rows_equal_the_stock_eager_attention(tiny_checkpoint, records):
    loaded = load_model(str(tiny_checkpoint), attn_implementation="eager")
    p = encode_at_budget(loaded.processor, _image(records[1]), records[1].question, BUDGET)
    answer = [70, 71, 72, loaded.processor.token_id("<|im_end|>")]
    attn = answer_attention(loaded.model, p, answer, {1, 3})
    ids = torch.cat([p.input_ids, torch.tensor([answer[:-1]])], dim=1)
    with torch.no_grad():
        out = loaded.model(input_ids=ids, pixel_values=p.pixel_values, image_grid_thw=p.grid_thw,
                           mm_token_type_ids=(ids == loaded.model.config.image_token_id).int(), output_attentions=True)
    image = (ids[0] == loaded.model.config.image_token_id).nonzero()[:, 0]
    for layer in (1, 3):
        rows = out.attentions[layer][0, :, p.input_ids.shape[1] :][:, :, image]  # (H, n-1, Nv)
        assert rows.shape[1] == 3 and torch.allclose(attn[layer], rows.mean(1), atol=1e-6, rtol=0)


def test_pseudo_labels_drop_answers_shorter_than_two_tokens(tiny_loaded, records):
    labels = make_pseudo_labels(tiny_loaded, records[:2], token_budget=BUDGET, max_new_tokens=1)
    assert labels.samples == [] and labels.dropped == {"short_answer": 2}
    labels = make_pseudo_labels(tiny_loaded, records[:2], token_budget=BUDGET, answer_source="dataset")
    assert len(labels.samples) == 2 and labels.samples[0].grounding.shape == (6, 6)
    assert torch.allclose(labels.samples[0].sink, torch.zeros(6, 6))  # heuristic heads: no sink heads


def test_one_rpn_step_lowers_the_loss_and_moves_only_the_twig(tiny_loaded, rpn_samples):
    for s in rpn_samples:  # box labels are laid on the grid the encoder really produces
        p = encode_at_budget(tiny_loaded.processor, square_pad(_image(s)), s.question, BUDGET)
        assert p.merged_hw == tuple(s.labels.shape) == (6, 6) and int((s.labels == 1).sum()) >= 1
    trunk, old_branches = _params(tiny_loaded.model), _params(tiny_loaded.branches)
    fresh = training_branches(tiny_loaded, "twig", 2, 2)
    result = train_rpn(tiny_loaded, rpn_samples, ONE_STEP)
    before = result.losses[0][1]
    assert before == pytest.approx(evaluate_rpn(tiny_loaded, rpn_samples, fresh)["loss"], rel=1e-5)
    after = evaluate_rpn(tiny_loaded, rpn_samples, result.branches)["loss"]
    assert after < before
    assert _same(trunk, _params(tiny_loaded.model)) and _same(old_branches, _params(tiny_loaded.branches))
    assert all(p.grad is None for p in tiny_loaded.model.parameters())
    new = _params(result.branches)
    assert _same(new, old_branches, "gate_") and not _same(new, _params(fresh), "rpn_layers.")


def test_pos_weight_scales_the_foreground_terms_of_the_selective_bce(tiny_loaded, rpn_samples):
    branches = training_branches(tiny_loaded, "twig", 2, 2)
    cells = sum(int((s.labels != -100).sum()) for s in rpn_samples)
    fg = bg = 0.0
    with torch.no_grad():
        for s in rpn_samples:
            valid = s.labels != -100
            z, y = rpn_map(tiny_loaded, branches, s)[valid], s.labels[valid].float()
            fg += float(F.softplus(-z)[y == 1].sum())  # -log sigmoid(z) on foreground cells
            bg += float(F.softplus(z)[y == 0].sum())
        weighted = _rpn_batch(tiny_loaded, branches, rpn_samples, backward=False, pos_weight=4.0)["loss"]
    assert weighted == pytest.approx((4.0 * fg + bg) / cells, rel=1e-4)
    assert fg > 0 and bg > 0
    with pytest.raises(InvalidInput, match="pos_weight"):
        train_rpn(tiny_loaded, rpn_samples, ONE_STEP, pos_weight=0.0)


def test_one_gate_step_lowers_the_loss_and_moves_only_the_gate(tiny_loaded, gate_data):
    trunk, old_branches = _params(tiny_loaded.model), _params(tiny_loaded.branches)
    result = train_gate(tiny_loaded, gate_data, ONE_STEP)
    items = gate_data.draw(0)
    assert {y for _, _, y in items} == {0, 1}
    before = result.losses[0][1]
    after = evaluate_gate(tiny_loaded, items, result.branches)["loss"]
    assert after < before
    assert _same(trunk, _params(tiny_loaded.model)) and _same(old_branches, _params(tiny_loaded.branches))
    new = _params(result.branches)
    assert _same(new, old_branches, "rpn_layers.") and not _same(new, old_branches, "gate_layers.")


def test_gate_logit_is_the_engine_gate_score_before_its_sigmoid(tiny_loaded, records):
    p = encode_at_budget(tiny_loaded.processor, _image(records[0]), records[0].question, BUDGET)
    state = trunk_state(tiny_loaded.model, p, 2)
    with torch.no_grad():
        z = gate_logit(tiny_loaded.branches, state)
        score = tiny_loaded.branches.gate_score(state.h_k, _mask(state), state.position_embeddings)
    assert torch.allclose(torch.sigmoid(z), score, atol=1e-6)


def test_trained_branches_export_in_the_released_layout_and_the_engine_runs(tiny_loaded, rpn_samples, gate_data,
                                                                             records, tmp_path):
    rpn = train_rpn(tiny_loaded, rpn_samples, ONE_STEP, out_dir=tmp_path / "rpn")
    back = load_model(str(rpn.model_dir))
    assert _same(_params(rpn.branches), _params(back.branches), "rpn_layers.")
    assert _same(_params(tiny_loaded.branches), _params(back.branches), "gate_")
    engine = QZoomEngine(back, EngineConfig(max_new_tokens=3, **TINY_BUDGET))
    image = _image(records[0])
    result = engine.answer([Request(image, "What digit?", RequestOptions(mode="zoom", roi_threshold=0.0))])[0]
    assert result.route == "zoom" and result.roi_source == "sd_rpn"

    gate = train_gate(back, gate_data, ONE_STEP, out_dir=tmp_path / "gate", gate_threshold=0.3)
    final = load_model(str(gate.model_dir))
    assert _same(_params(gate.branches), _params(final.branches), "gate_")
    assert _same(_params(back.branches), _params(final.branches), "rpn_layers.")  # stage 1 kept
    assert final.checkpoint.gate_threshold == pytest.approx(0.3)
    auto = QZoomEngine(final, EngineConfig(max_new_tokens=3, **TINY_BUDGET)).answer([Request(image, "What digit?")])[0]
    assert 0.0 <= auto.gate_score <= 1.0


def test_an_rpn_trained_on_plain_weights_loads_with_a_twig_only(plain_checkpoint, rpn_samples, tmp_path):
    plain = load_model(str(plain_checkpoint))
    result = train_rpn(plain, rpn_samples, ONE_STEP, out_dir=tmp_path / "plain")
    back = load_model(str(result.model_dir))
    assert back.branches.has_rpn and not back.branches.has_gate
    assert (back.branches.branch_layer, back.branches.rpn_depth) == (3, 1)  # round(0.64 x 4), min(3, 4 - 3)


def test_resume_continues_at_the_saved_step_and_matches_an_uninterrupted_run(tiny_loaded, rpn_samples, tmp_path):
    config = TrainConfig(lr=1e-3, batch_size=2, steps=4, warmup=0.25, save_every=2)
    full = train_rpn(tiny_loaded, rpn_samples, config, out_dir=tmp_path / "full")

    def crash(step, loss):
        if step == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_rpn(tiny_loaded, rpn_samples, config, out_dir=tmp_path / "cut", callback=crash)
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-00000002"
    resumed = train_rpn(tiny_loaded, rpn_samples, config, out_dir=tmp_path / "cut", resume=True)
    assert resumed.start_step == 2 and [s for s, _ in resumed.losses] == [3, 4]
    assert resumed.losses == full.losses[2:]
    assert _same(_params(full.branches), _params(resumed.branches), "rpn_layers.")

    other = TrainConfig(lr=2e-3, batch_size=2, steps=4, warmup=0.25, save_every=2)
    with pytest.raises(CheckpointError, match="settings differ in config"):
        train_rpn(tiny_loaded, rpn_samples, other, out_dir=tmp_path / "full", resume=True)
    with pytest.raises(InvalidInput, match="already holds checkpoints"):
        train_rpn(tiny_loaded, rpn_samples, config, out_dir=tmp_path / "full")


def test_a_save_killed_midway_leaves_no_complete_looking_checkpoint(tiny_loaded, rpn_samples, tmp_path, monkeypatch):
    config = TrainConfig(lr=1e-3, batch_size=2, steps=4, warmup=0.0, save_every=2)
    real_save = ckpt_mod.save_file
    calls = []

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half the file, then the process is gone
            Path(path).write_bytes(b"\x00" * 16)
            raise KeyboardInterrupt("SIGKILL")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", dying_save)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        train_rpn(tiny_loaded, rpn_samples, config, out_dir=tmp_path / "run")
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in root.iterdir())
    assert names[0].startswith(".tmp-step-00000004") and names[1:] == ["step-00000002"]
    assert latest_checkpoint(root).name == "step-00000002"
    assert not (tmp_path / "run" / "model").exists()
    resumed = train_rpn(tiny_loaded, rpn_samples, config, out_dir=tmp_path / "run", resume=True)
    assert resumed.start_step == 2 and (resumed.model_dir / "config.json").is_file()


def test_zoom_top_rungs_are_answered_through_the_zoom_route(tiny_loaded, records):
    from qzoom_service.train.gate_labels import make_answer_ladders

    res = (16, 25, 36)
    ladders = make_answer_ladders(tiny_loaded, records[:2], res, max_new_tokens=3, zoom_top=1)
    assert ladders.settings["zoom_top"] == 1
    engine = QZoomEngine(tiny_loaded, EngineConfig(max_new_tokens=3))
    for ladder, record in zip(ladders.ladders, records):
        image = _image(record)
        ask = lambda r, mode: engine.answer([Request(image, record.question, RequestOptions(  # noqa: E731
            mode=mode, min_pixels=r * tiny_loaded.factor**2, max_pixels=r * tiny_loaded.factor**2))])[0]
        assert ladder.answers[0] == ask(16, "direct").answer
        top = ask(36, "zoom")
        assert top.route == "zoom" and ladder.answers[2] == top.answer


def test_zoom_top_needs_a_trained_rpn(plain_checkpoint, records):
    from qzoom_service.train.gate_labels import make_answer_ladders

    with pytest.raises(InvalidInput, match="SD-RPN"):
        make_answer_ladders(load_model(str(plain_checkpoint)), records[:1], (16, 25, 36), zoom_top=1)
    with pytest.raises(InvalidInput, match="zoom_top"):
        make_answer_ladders(load_model(str(plain_checkpoint)), records[:1], (16, 25, 36), zoom_top=4)


def test_gate_calibration_table_matches_the_scores(tiny_loaded, gate_data):
    from qzoom_service.train.train_heads import gate_calibration

    items = gate_data.draw(0)
    positives = sum(y for _, _, y in items)
    table = gate_calibration(tiny_loaded, items, thresholds=(0.0, 0.5, 1.01))
    always, _, never = table
    assert always["zoom_rate"] == 1.0 and always["recall"] == 1.0
    assert always["precision"] == pytest.approx(positives / len(items))
    assert never["zoom_rate"] == 0.0 and never["recall"] == 0.0 and never["precision"] is None
    assert never["accuracy"] == pytest.approx(1 - positives / len(items))
    scores = [float(torch.sigmoid(_gate_score_logit(tiny_loaded, item))) for item in items]
    assert table[1]["zoom_rate"] == pytest.approx(sum(s >= 0.5 for s in scores) / len(items))


def _gate_score_logit(loaded, item):
    ladder, res, _ = item
    p = encode_at_budget(loaded.processor, open_image(ladder.image, "t"), ladder.question, res)
    state = trunk_state(loaded.model, p, loaded.branches.branch_layer)
    with torch.no_grad():
        return gate_logit(loaded.branches, state)


def test_holdout_split_is_seeded_and_disjoint(gate_data):
    train, held = gate_data.split(0.5)
    again_train, again_held = gate_data.split(0.5)
    assert [l.uid for l in held.items] == [l.uid for l in again_held.items]
    assert len(held.items) == 2 and len(train.items) == len(gate_data.items) - 2
    assert not {l.uid for l in held.items} & {l.uid for l in train.items}

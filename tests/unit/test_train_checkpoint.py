"""Atomic output directories, the batch plan and the learning-rate schedule."""

from __future__ import annotations

import pytest

from qzoom_service.errors import InvalidInput
from qzoom_service.train.checkpoint import atomic_dir, latest_checkpoint
from qzoom_service.train.loop import TrainConfig, lr_factor, plan_batches


def test_atomic_dir_replaces_an_earlier_output_and_refuses_a_foreign_directory(tmp_path):
    with atomic_dir(tmp_path / "out", "labels.json") as tmp:
        (tmp / "labels.json").write_text("1")
    with atomic_dir(tmp_path / "out", "labels.json") as tmp:
        (tmp / "labels.json").write_text("2")
    assert (tmp_path / "out" / "labels.json").read_text() == "2"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.jsonl").write_text("{}")
    with pytest.raises(InvalidInput, match="not an earlier output"):
        with atomic_dir(tmp_path / "data", "labels.json"):
            pass
    assert (tmp_path / "data" / "data.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]


def test_an_error_inside_atomic_dir_leaves_neither_output_nor_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "ckpt" / "step-00000003", "state.json") as tmp:
            (tmp / "state.json").write_text("{}")
            raise RuntimeError("disk full")
    assert list((tmp_path / "ckpt").iterdir()) == [] and latest_checkpoint(tmp_path / "ckpt") is None


def test_plan_is_seeded_covers_every_item_per_epoch_and_cycles_for_steps():
    items = lambda epoch: list(range(5))  # noqa: E731
    plan = plan_batches(items, 2, epochs=2, steps=None, seed=1)
    assert [len(b) for b in plan] == [2, 2, 1, 2, 2, 1]
    assert sorted(sum(plan[:3], [])) == list(range(5)) and sorted(sum(plan[3:], [])) == list(range(5))
    assert plan == plan_batches(items, 2, epochs=2, steps=None, seed=1) != plan_batches(items, 2, 2, None, seed=2)
    assert len(plan_batches(items, 2, epochs=1, steps=7, seed=1)) == 7
    with pytest.raises(InvalidInput, match="no training items"):
        plan_batches(lambda epoch: [], 2, 1, None, 0)


def test_lr_warms_up_linearly_then_decays_by_cosine_without_a_zero_step():
    factors = [lr_factor(s, 10, 0.2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert min(factors) > 0 and lr_factor(0, 1, 0.03) == 1.0 and lr_factor(0, 4, 0.0) == 1.0


@pytest.mark.parametrize("bad", [dict(lr=0), dict(batch_size=0), dict(warmup=1.0), dict(steps=0), dict(clip=-1)])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(InvalidInput, match="invalid training settings"):
        TrainConfig(**bad)


def test_export_writes_the_released_layout_without_touching_the_live_model(tmp_path, tiny_loaded):
    """The training export goes through released.py: the new branches under their released names, the loaded
    checkpoint's other settings kept, the gate threshold set, and the live model left as it was."""
    import copy
    import json

    import torch
    from safetensors.torch import load_file

    from qzoom_service.model import load_model
    from qzoom_service.train.checkpoint import export_released

    branches = copy.deepcopy(tiny_loaded.branches)
    with torch.no_grad():
        branches.gate_head.bias.fill_(0.25)
    config_before = tiny_loaded.model.config.to_dict()
    out = export_released(tiny_loaded, branches, tmp_path / "model", gate_threshold=0.3)
    assert not hasattr(tiny_loaded.model, "qzoom") and tiny_loaded.model.config.to_dict() == config_before
    keys = load_file(out / "model.safetensors").keys()
    assert "model.high_res_head.bias" in keys and "model.twig_layers.0.mlp.up_proj.weight" in keys
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["high_res_thresh"] == 0.3 and cfg["reuse_src_pos"] is tiny_loaded.checkpoint.reuse_src_pos
    back = load_model(str(out))
    assert back.checkpoint.gate_threshold == pytest.approx(0.3)
    assert torch.equal(back.branches.gate_head.bias, torch.full((1,), 0.25))
    assert torch.equal(back.branches.rpn_layers[1].mlp.up_proj.weight, branches.rpn_layers[1].mlp.up_proj.weight)

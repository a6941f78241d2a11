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

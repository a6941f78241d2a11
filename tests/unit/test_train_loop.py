"""The shared optimisation loop (train/loop.py): an early stop keeps the run's schedule and resumes into it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qzoom_service.errors import InvalidInput
from qzoom_service.train.loop import TrainConfig, fit, lr_factor, plan_batches

CONFIG = TrainConfig(lr=0.05, batch_size=2, steps=6, warmup=0.2, save_every=5, keep_checkpoints=3)
CPU = torch.device("cpu")


def _problem():
    """A linear regression whose every piece (init, data, plan) is fixed, so two runs can be compared."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    batches = plan_batches(lambda epoch: list(range(12)), CONFIG.batch_size, CONFIG.epochs, CONFIG.steps, CONFIG.seed)

    def step(batch):
        loss = F.mse_loss(net(x[batch]), y[batch])
        loss.backward()
        return float(loss.detach())

    return net, batches, step


def test_stop_at_ends_early_on_the_full_schedule_and_a_resume_finishes_the_same_run(tmp_path):
    net, batches, step = _problem()
    seen = []
    _, losses = fit(net, batches, step, CONFIG, {"role": "test"}, CPU, out_dir=tmp_path, stop_at=4,
                    callback=lambda done, loss: seen.append(done))
    assert seen == [1, 2, 3, 4] and [s for s, _ in losses] == [1, 2, 3, 4]
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([CONFIG.lr * lr_factor(s, 6, CONFIG.warmup) for s in range(4)])
    # Checkpointed at the stop although 4 is not a multiple of save_every.
    assert (tmp_path / "checkpoints" / "step-00000004" / "state.json").is_file()

    start, rest = fit(net, batches, step, CONFIG, {"role": "test"}, CPU, out_dir=tmp_path, resume=True)
    assert start == 4 and [s for s, _ in rest] == [5, 6]

    straight, batches2, step2 = _problem()
    fit(straight, batches2, step2, CONFIG, {"role": "test"}, CPU)
    torch.testing.assert_close(net.weight, straight.weight)
    torch.testing.assert_close(net.bias, straight.bias)


@pytest.mark.parametrize("stop_at", [0, 7])
def test_stop_at_outside_the_plan_is_refused(stop_at):
    net, batches, step = _problem()
    with pytest.raises(InvalidInput, match="stop_at"):
        fit(net, batches, step, CONFIG, {"role": "test"}, CPU, stop_at=stop_at)

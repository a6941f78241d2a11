"""The optimisation loop both stages share: AdamW, warm-up + cosine, grad clipping, resumable checkpoints.

The stage-1 / stage-3 hyper-parameters of the reference implementation (github.com/YuHengsss/Q-Zoom) are
the `TrainConfig` defaults: AdamW lr 1e-4, betas (0.9, 0.999) (its scripts' HF default; its README says
0.98 — UNKNOWN which the paper used), weight decay 0, linear warm-up over 3 % of the steps then cosine
to 0, max grad norm 1.0, effective batch 128, 1 epoch.

`fit` leaves the forward passes to the stage's step function. The branch stages (`train_heads.py`) run
their batch one sample at a time and accumulate gradients, each sample's loss already divided by the
batch's normaliser, so the gradient equals that of the reference's pooled batch loss without padding
sequences of different lengths; the base model (`base.py`) runs one right-padded forward per batch.
The whole batch plan (every epoch's order and, for the gate, every drawn label) is fixed up front from
the seed, so a resumed run replays exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..errors import CheckpointError, InvalidInput
from ..synthetic import stable_seed
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "TrainResult", "plan_batches", "plan_digest", "lr_factor", "fit"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are the reference's (see module docstring)."""

    lr: float = 1e-4
    batch_size: int = 128  # samples per optimizer step (the reference's effective batch)
    epochs: int = 1
    steps: int | None = None  # stop after this many optimizer steps (cycling epochs); overrides `epochs`
    warmup: float = 0.03  # fraction of the steps
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: float = 1.0  # max grad norm; 0 disables clipping
    seed: int = 0
    save_every: int = 0  # checkpoint every N steps (and at the last step); 0 = no resumable checkpoints
    keep_checkpoints: int = 2

    def __post_init__(self):
        checks = [("lr", self.lr > 0), ("batch_size", self.batch_size >= 1), ("epochs", self.epochs >= 1),
                  ("steps", self.steps is None or self.steps >= 1), ("warmup", 0.0 <= self.warmup < 1.0),
                  ("betas", all(0.0 <= b < 1.0 for b in self.betas)), ("clip", self.clip >= 0),
                  ("weight_decay", self.weight_decay >= 0), ("save_every", self.save_every >= 0),
                  ("keep_checkpoints", self.keep_checkpoints >= 1)]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise InvalidInput(f"invalid training settings: {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)} "
                               "(lr > 0, batch_size/epochs/steps >= 1, 0 <= warmup < 1, betas in [0, 1), "
                               "clip/weight_decay/save_every >= 0, keep_checkpoints >= 1)")


@dataclass
class TrainResult:
    branches: object  # QZoomBranches (float32 master weights) with the trained branch
    role: str  # "twig" | "gate"
    K: int
    T: int
    total_steps: int
    start_step: int  # > 0 when resumed
    losses: list = field(default_factory=list)  # (step, loss) for the steps run in this call
    model_dir: Path | None = None  # the released-layout checkpoint, when an output directory was given


def plan_batches(epoch_items: Callable[[int], list], batch_size: int, epochs: int, steps: int | None,
                 seed: int) -> list[list]:
    """Every optimizer step's batch: each epoch's items in a seeded order, cut into batches (the last
    one may be short). With `steps`, epochs repeat until that many batches exist."""
    batches, epoch = [], 0
    while True:
        items = epoch_items(epoch)
        if not items:
            raise InvalidInput(f"epoch {epoch} has no training items (every sample filtered out or ignored)")
        order = list(range(len(items)))
        random.Random(stable_seed(seed, "order", epoch)).shuffle(order)
        for i in range(0, len(order), batch_size):
            batches.append([items[j] for j in order[i : i + batch_size]])
            if steps is not None and len(batches) == steps:
                return batches
        epoch += 1
        if steps is None and epoch == epochs:
            return batches


def plan_digest(batches: list[list], key: Callable) -> str:
    """A short hash of the plan (`key(item)` -> JSON-able), to refuse resuming on different data."""
    text = json.dumps([[key(item) for item in batch] for batch in batches])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ceil(warmup x total) steps, then cosine to 0 (HF `cosine_with_warmup`,
    shifted by one so that no optimizer step runs at lr 0). step is 0-based."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def fit(trainable: torch.nn.Module, batches: list[list], step_fn: Callable[[list], float | None],
        config: TrainConfig, settings: dict, device: torch.device, *, out_dir: Path | None = None,
        resume: bool = False, progress: bool = False, callback: Callable | None = None,
        stop_at: int | None = None) -> tuple[int, list]:
    """Run optimizer steps over `batches`. step_fn(batch) does the forward passes and `backward()` and
    returns the pooled loss (None when the batch has nothing to learn: no update). Returns
    (start step, [(step, loss)]). `callback(step, loss)` runs after each step (1-based step count).

    `stop_at` ends the run after that many steps (counted from the start of the plan, not of this call)
    and checkpoints there; the schedule stays the one of all `batches`, so a later resume without it
    continues the same run."""
    end = len(batches) if stop_at is None else stop_at
    if not 1 <= end <= len(batches):
        raise InvalidInput(f"stop_at must be between 1 and the plan's {len(batches)} steps; got {stop_at}")
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    # Checkpoint cadence may change between a run and its resumption; everything else must match.
    run_config = {k: v for k, v in asdict(config).items() if k not in ("save_every", "keep_checkpoints")}
    settings = {**settings, "config": run_config, "total_steps": len(batches)}
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from JSON
    root = out_dir / "checkpoints" if out_dir is not None else None
    start = 0
    latest = latest_checkpoint(root) if root is not None else None
    if resume and root is None:
        raise InvalidInput("resume needs an output directory holding checkpoints")
    if not resume and latest is not None:
        raise InvalidInput(f"{out_dir} already holds checkpoints ({latest.name}): resume, or use a new directory")
    if resume:
        if latest is not None:
            start, state, saved = load_checkpoint(latest, optimizer)
            diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            if diff:
                raise CheckpointError(f"{latest}: cannot resume, the run settings differ in {', '.join(diff)}")
            trainable.load_state_dict(state, strict=True)
            log.info("resuming from %s at step %d of %d", latest, start, len(batches))
    losses = []
    metrics = (out_dir / "metrics.jsonl").open("a" if start else "w") if out_dir is not None else None
    try:
        for step in tqdm(range(start, end), initial=start, total=len(batches), disable=not progress,
                         desc=f"train {settings.get('role', '')}"):
            lr = config.lr * lr_factor(step, len(batches), config.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss = step_fn(batches[step])
            if loss is not None:
                if config.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.clip)
                optimizer.step()
            losses.append((step + 1, loss))
            if metrics is not None:
                metrics.write(json.dumps({"step": step + 1, "loss": loss, "lr": lr}) + "\n")
                metrics.flush()
            done = step + 1
            if root is not None and config.save_every and (done % config.save_every == 0 or done == end):
                save_checkpoint(root, done, trainable.state_dict(), optimizer, settings, device,
                                keep=config.keep_checkpoints)
            if callback is not None:
                callback(done, loss)
    finally:
        if metrics is not None:
            metrics.close()
    return start, losses

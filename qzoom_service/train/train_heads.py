"""Train the two small branches on a frozen Qwen2.5-VL: the SD-RPN twig (stage 1) and the gate (stage 3).

Both start from the frozen trunk's h_K (computed under no_grad: nothing upstream of the
branches trains) and train only their own branch, as float32 master weights (autocast to the
model's dtype when that is not float32):

- `train_rpn` (Q-Zoom stage 1): `rpn_layers` initialised from base layers K..K+T-1; the map is
  `QZoomBranches.rpn_logits` (mean over heads of the last prompt token's scaled q.k over the image
  tokens); loss = BCE-with-logits over every cell with label != -100, pooled over the batch.
- `train_gate` (Q-Zoom stage 3): `gate_layers` (from base layers K..K+T-1) + `gate_head`
  (default Linear init); loss = BCE-with-logits of the last prompt token's logit, ignored draws removed.

The branch not being trained is carried over unchanged from the loaded checkpoint, so a stage-3 run on a
stage-1 output keeps its twig. The result is exported in the released layout (`checkpoint.export_released`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..coarse import causal_mask
from ..errors import InvalidInput
from ..heads import QZoomBranches
from ..rpn import roi_logits
from .checkpoint import export_released
from .data import open_image
from .gate_labels import GateDataset
from .inputs import encode_at_budget, for_branch, square_pad, trunk_state
from .loop import TrainConfig, TrainResult, fit, plan_batches, plan_digest
from .rpn_labels import IGNORE, RPNSample

__all__ = ["default_branch_shape", "branch_shape", "training_branches", "rpn_map", "gate_logit", "train_rpn",
           "train_gate", "evaluate_rpn", "evaluate_gate", "gate_calibration", "CALIBRATION_THRESHOLDS"]

CALIBRATION_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

# The (K, T) defaults of github.com/YuHengsss/Q-Zoom's README: Qwen2.5-VL-3B (36 layers) and -7B (28 layers).
_KNOWN_SHAPES = {36: (24, 3), 28: (18, 3)}
_PREFIX = {"twig": ("rpn_layers.",), "gate": ("gate_layers.", "gate_head.")}


def default_branch_shape(num_layers: int) -> tuple[int, int]:
    """(K, T): the paper's values for 3B/7B; otherwise OUR heuristic K = round(0.64 L), T = min(3, L - K)."""
    if num_layers in _KNOWN_SHAPES:
        return _KNOWN_SHAPES[num_layers]
    k = max(1, min(num_layers - 1, int(0.64 * num_layers + 0.5)))
    return k, min(3, num_layers - k)


def branch_shape(loaded, role: str, K: int | None = None, T: int | None = None) -> tuple[int, int]:
    """K, T for `role` ('twig' | 'gate'): explicit values, else the checkpoint's branch of that role,
    else the other branch's K (one trunk prefix serves both), else `default_branch_shape`."""
    b = loaded.branches
    n = loaded.model.config.text_config.num_hidden_layers
    if role == "twig":
        own, other_k = ((b.branch_layer, b.rpn_depth) if b.has_rpn else None), b.branch_layer if b.has_gate else None
    else:
        own, other_k = ((b.branch_layer, b.gate_depth) if b.has_gate else None), b.branch_layer if b.has_rpn else None
    default_k, default_t = default_branch_shape(n)
    k = K if K is not None else own[0] if own else other_k if other_k is not None else default_k
    if T is not None:
        t = T
    else:
        t = own[1] if own and own[0] == k else min(default_t, n - k)
    if not (0 < k < n and t >= 1 and k + t <= n):
        raise InvalidInput(f"{role} branch needs 0 < K < {n}, T >= 1 and K + T <= {n}; got K={k}, T={t}")
    return k, t


def training_branches(loaded, role: str, K: int, T: int, *, init_from_trunk: bool = True,
                      seed: int = 0) -> QZoomBranches:
    """Fresh float32 `QZoomBranches` on the model's device: the `role` branch initialised from base layers
    K..K+T-1 (or copied from the checkpoint's own branch when `init_from_trunk` is False), the other
    branch copied unchanged from the checkpoint. The gate head gets the default Linear init (seeded)."""
    if role not in _PREFIX:
        raise InvalidInput(f"role must be 'twig' or 'gate'; got {role!r}")
    old = loaded.branches
    keep_other = old.has_gate if role == "twig" else old.has_rpn
    other_k = old.branch_layer if keep_other else None
    if keep_other and other_k != K:
        raise InvalidInput(f"the checkpoint's other branch starts at layer {other_k}; both branches share one "
                           f"trunk prefix, so train with K={other_k}")
    shape = dict(branch_layer=K, rpn_depth=T) if role == "twig" else dict(branch_layer=K, gate_depth=T)
    if keep_other:
        shape |= dict(gate_depth=old.gate_depth) if role == "twig" else dict(rpn_depth=old.rpn_depth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = QZoomBranches.create(loaded.model.config.text_config, **shape)
    new.init_from_trunk(loaded.model.model.language_model.layers)
    old_state = old.state_dict()
    carried = {k: v for k, v in old_state.items() if not k.startswith(_PREFIX[role])} if keep_other else {}
    if not init_from_trunk:
        mine = {k: v for k, v in old_state.items() if k.startswith(_PREFIX[role])}
        want = {k: v for k, v in new.state_dict().items() if k.startswith(_PREFIX[role])}
        if set(mine) != set(want) or any(mine[k].shape != want[k].shape for k in want):
            raise InvalidInput(f"init_from_trunk=False needs a {role} branch of K={K}, T={T} in the checkpoint")
        carried |= mine
    new.load_state_dict(carried, strict=False)
    return new.to(device=loaded.model.device, dtype=torch.float32)


def _trainable(branches: QZoomBranches, role: str) -> nn.ModuleDict:
    """The role's modules under their `QZoomBranches` names (so state dict keys match)."""
    names = ["rpn_layers"] if role == "twig" else ["gate_layers", "gate_head"]
    for p in branches.parameters():
        p.requires_grad_(False)
    part = nn.ModuleDict({n: getattr(branches, n) for n in names})
    for p in part.parameters():
        p.requires_grad_(True)
    return part


def _dtype(branches: QZoomBranches) -> torch.dtype:
    return next(branches.parameters()).dtype


def _autocast(model):
    dtype = model.dtype
    return torch.autocast(model.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def rpn_map(loaded, branches: QZoomBranches, sample: RPNSample) -> torch.Tensor:
    """Raw SD-RPN logits (gh, gw) for one sample, bilinearly resized to its label grid if the encoded grid
    differs (as the reference does). Gradients reach only the twig branch."""
    image = open_image(sample.image, f"sample {sample.uid}")
    fed = square_pad(image) if sample.pad_square else image
    prepared = encode_at_budget(loaded.processor, fed, sample.question, sample.token_budget)
    state = for_branch(trunk_state(loaded.model, prepared, branches.branch_layer), _dtype(branches))
    with _autocast(loaded.model):
        logits = roi_logits(branches, state, prepared.merged_hw).float()
    if tuple(logits.shape) != tuple(sample.labels.shape):
        logits = F.interpolate(logits[None, None], size=tuple(sample.labels.shape), mode="bilinear",
                               align_corners=False)[0, 0]
    return logits


def gate_logit(branches: QZoomBranches, state) -> torch.Tensor:
    """Pre-sigmoid gate output (1,): `QZoomBranches.gate_score` without its sigmoid (BCE-with-logits)."""
    length = state.h_k.shape[1]
    mask = causal_mask(length, length, state.h_k.dtype, state.h_k.device)
    return branches.gate_logit(state.h_k, mask, state.position_embeddings)


def _gate_forward(loaded, branches, item, suffix: str) -> torch.Tensor:
    ladder, res, _ = item
    image = open_image(ladder.image, f"sample {ladder.uid}")
    prepared = encode_at_budget(loaded.processor, image, ladder.question + suffix, res)
    state = for_branch(trunk_state(loaded.model, prepared, branches.branch_layer), _dtype(branches))
    with _autocast(loaded.model):
        return gate_logit(branches, state)


def _rpn_batch(loaded, branches, batch: list[RPNSample], backward: bool, pos_weight: float = 1.0) -> dict:
    """Pooled selective BCE over the batch (sum over valid cells / number of valid cells); foreground cells
    weigh `pos_weight` (1 in the reference)."""
    device = loaded.model.device
    cells = sum(int((s.labels != IGNORE).sum()) for s in batch)
    if cells == 0:
        return {"loss": None, "cells": 0}
    total, fg_hit, fg_n, bg_hit, bg_n = 0.0, 0, 0, 0, 0
    weight = torch.tensor(pos_weight, device=device)
    for s in batch:
        labels = s.labels.to(device)
        valid = labels != IGNORE
        if not bool(valid.any()):
            continue
        logits = rpn_map(loaded, branches, s)[valid]
        target = labels[valid].float()
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum", pos_weight=weight) / cells
        if backward:
            loss.backward()
        total += float(loss.detach())
        pred = logits.detach() > 0
        fg_hit += int((pred & (target == 1)).sum()); fg_n += int((target == 1).sum())
        bg_hit += int((~pred & (target == 0)).sum()); bg_n += int((target == 0).sum())
    return {"loss": total, "cells": cells, "fg_accuracy": fg_hit / fg_n if fg_n else None,
            "bg_accuracy": bg_hit / bg_n if bg_n else None}


def _gate_batch(loaded, branches, batch: list, suffix: str, backward: bool) -> dict:
    """Mean BCE-with-logits over the batch's (already non-ignored) draws."""
    if not batch:
        return {"loss": None, "n": 0}
    device = loaded.model.device
    total, hits = 0.0, 0
    for item in batch:
        z = _gate_forward(loaded, branches, item, suffix)
        y = torch.tensor([float(item[2])], device=device)
        loss = F.binary_cross_entropy_with_logits(z, y, reduction="sum") / len(batch)
        if backward:
            loss.backward()
        total += float(loss.detach())
        hits += int((float(z.detach()) > 0) == bool(item[2]))
    return {"loss": total, "n": len(batch), "accuracy": hits / len(batch)}


def train_rpn(loaded, samples: list[RPNSample], config: TrainConfig = TrainConfig(), *, K: int | None = None,
              T: int | None = None, init_from_trunk: bool = True, out_dir: str | Path | None = None,
              resume: bool = False, progress: bool = False, callback=None, pos_weight: float = 1.0) -> TrainResult:
    """Stage 1: train the SD-RPN twig branch on tri-state cell labels (see module docstring). `pos_weight`
    > 1 weighs foreground cells up (OUR option for targets covering 1-2 cells of the map).

    With `out_dir`: `metrics.jsonl`, `checkpoints/step-N` every `config.save_every` steps, and the final
    released-layout checkpoint in `out_dir/model`. `resume=True` continues from the newest checkpoint.
    """
    if not samples:
        raise InvalidInput("no stage-1 training samples (all dropped, or an empty label set)")
    k, t = branch_shape(loaded, "twig", K, T)
    branches = training_branches(loaded, "twig", k, t, init_from_trunk=init_from_trunk, seed=config.seed)
    batches = plan_batches(lambda epoch: list(samples), config.batch_size, config.epochs, config.steps, config.seed)
    if not pos_weight > 0:
        raise InvalidInput(f"pos_weight must be > 0, got {pos_weight}")
    settings = {"role": "twig", "K": k, "T": t, "init_from_trunk": init_from_trunk, "pos_weight": pos_weight,
                "plan": plan_digest(batches, lambda s: [s.uid, int(s.labels.sum())])}
    return _run(loaded, branches, "twig", batches, lambda b: _rpn_batch(loaded, branches, b, True, pos_weight)["loss"],
                config, settings, out_dir, resume, progress, callback)


def train_gate(loaded, dataset: GateDataset, config: TrainConfig = TrainConfig(), *, K: int | None = None,
               T: int | None = None, init_from_trunk: bool = True, out_dir: str | Path | None = None,
               resume: bool = False, progress: bool = False, callback=None, prompt_suffix: str | None = None,
               gate_threshold: float | None = None) -> TrainResult:
    """Stage 3: train the gate branch on `dataset` (labels re-drawn every epoch, as the reference's
    `create_high_res_signal` does at every fetch).

    `prompt_suffix` defaults to the one the ladders were answered with; `gate_threshold` is written to
    the exported config as `high_res_thresh`. Other arguments as in `train_rpn`.
    """
    if not dataset.items:
        raise InvalidInput(f"no stage-3 training samples survived the consistency filter ({dataset.stats})")
    suffix = dataset.prompt_suffix if prompt_suffix is None else prompt_suffix
    k, t = branch_shape(loaded, "gate", K, T)
    branches = training_branches(loaded, "gate", k, t, init_from_trunk=init_from_trunk, seed=config.seed)
    batches = plan_batches(dataset.draw, config.batch_size, config.epochs, config.steps, config.seed)
    settings = {"role": "gate", "K": k, "T": t, "init_from_trunk": init_from_trunk, "suffix": suffix,
                "plan": plan_digest(batches, lambda item: [item[0].uid, item[1], item[2]])}
    return _run(loaded, branches, "gate", batches, lambda b: _gate_batch(loaded, branches, b, suffix, True)["loss"],
                config, settings, out_dir, resume, progress, callback, gate_threshold)


def _run(loaded, branches, role, batches, step_fn, config, settings, out_dir, resume, progress, callback,
         gate_threshold=None) -> TrainResult:
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    trainable = _trainable(branches, role)
    start, losses = fit(trainable, batches, step_fn, config, settings, loaded.model.device, out_dir=out,
                        resume=resume, progress=progress, callback=callback)
    for p in branches.parameters():
        p.requires_grad_(False)
    branches.eval()
    model_dir = export_released(loaded, branches, out / "model", gate_threshold=gate_threshold) if out else None
    return TrainResult(branches, role, settings["K"], settings["T"], len(batches), start, losses, model_dir)


@torch.no_grad()
def evaluate_rpn(loaded, samples: list[RPNSample], branches: QZoomBranches | None = None) -> dict:
    """Pooled selective BCE and FG / BG cell accuracy (logit > 0) on `samples`."""
    return _rpn_batch(loaded, loaded.branches if branches is None else branches, list(samples), backward=False)


@torch.no_grad()
def evaluate_gate(loaded, items: list, branches: QZoomBranches | None = None, prompt_suffix: str = "") -> dict:
    """Mean BCE and accuracy (logit > 0 means zoom) on drawn items [(ladder, resolution, label)]."""
    return _gate_batch(loaded, loaded.branches if branches is None else branches, list(items), prompt_suffix,
                       backward=False)


@torch.no_grad()
def gate_calibration(loaded, items: list, branches: QZoomBranches | None = None, prompt_suffix: str = "",
                     thresholds=CALIBRATION_THRESHOLDS) -> list[dict]:
    """Precision / recall of "zoom" (gate score >= threshold, the engine's rule) against the drawn labels
    of `items` [(ladder, resolution, label)], one row per threshold, plus the zoom rate and accuracy."""
    branches = loaded.branches if branches is None else branches
    scores = [float(torch.sigmoid(_gate_forward(loaded, branches, item, prompt_suffix))) for item in items]
    labels = [bool(item[2]) for item in items]
    rows = []
    for t in thresholds:
        zoom = [sc >= t for sc in scores]
        tp = sum(z and y for z, y in zip(zoom, labels))
        fp = sum(z and not y for z, y in zip(zoom, labels))
        fn = sum(y and not z for z, y in zip(zoom, labels))
        rows.append({"threshold": t, "precision": tp / (tp + fp) if tp + fp else None,
                     "recall": tp / (tp + fn) if tp + fn else None,
                     "zoom_rate": sum(zoom) / len(zoom) if zoom else None,
                     "accuracy": sum(z == y for z, y in zip(zoom, labels)) / len(zoom) if zoom else None})
    return rows

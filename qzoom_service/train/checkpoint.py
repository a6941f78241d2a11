"""Training checkpoints (resumable, atomic) and the final export in the released Q-Zoom layout.

Resumable state lives in `<run>/checkpoints/step-<N>/`: `state.safetensors` (the trained branch
tensors, the optimizer's tensors, the torch RNG states) and `state.json` (step, optimizer scalars and
param groups, Python RNG, run settings). Every directory is written under a temporary name and renamed
into place only when complete, so a run killed mid-save leaves a `.tmp-*` directory that is never taken
for a checkpoint. No pickle anywhere.

The final model is written by `released.save_released` (base weights, branch tensors and the Q-Zoom
config.json keys under their released names), so `qzoom_service.model.load_model` reads it exactly like
an official checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, InvalidInput
from ..released import DEFAULT_GATE_THRESHOLD, save_released

__all__ = ["atomic_dir", "save_checkpoint", "latest_checkpoint", "load_checkpoint", "export_released"]

_STEP_DIR = re.compile(r"^step-(\d+)$")


@contextmanager
def atomic_dir(final: str | Path, marker: str):
    """Yield a temporary sibling directory; on success it replaces `final` by rename, on error it is removed.

    An existing `final` is replaced only if it is empty or holds `marker` (i.e. it is an earlier output of
    the same kind): pointing an output at, say, the dataset folder raises instead of deleting it.
    """
    final = Path(final)
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / marker).exists())):
        raise InvalidInput(f"{final} exists and is not an earlier output (no {marker}); choose another directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():  # move the previous version aside first: a rename cannot replace a non-empty dir
        old = final.parent / f".old-{final.name}-{tmp.name}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state(device: torch.device) -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"version": version, "state": list(state), "gauss": gauss}


def _restore_rng(tensors: dict, python: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))


def save_checkpoint(root: str | Path, step: int, branch_state: dict, optimizer: torch.optim.Optimizer,
                    settings: dict, device: torch.device, *, keep: int = 2) -> Path:
    """Write `root/step-<step>` atomically; then delete all but the newest `keep` checkpoints."""
    root = Path(root)
    tensors = {f"branch.{k}": v.detach().contiguous() for k, v in branch_state.items()}
    opt = optimizer.state_dict()
    scalars = {}
    for idx, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    rng_tensors, python_rng = _rng_state(device)
    tensors.update(rng_tensors)
    doc = {"step": step, "settings": settings, "param_groups": opt["param_groups"], "optim_scalars": scalars,
           "python_rng": python_rng}
    final = root / f"step-{step:08d}"
    with atomic_dir(final, "state.json") as tmp:
        save_file(tensors, tmp / "state.safetensors", metadata={"format": "qzoom-train-state/1"})
        (tmp / "state.json").write_text(json.dumps(doc))  # written last: a directory without it is incomplete
    for stale in sorted(_complete(root))[:-keep] if keep > 0 else []:
        shutil.rmtree(root / f"step-{stale:08d}", ignore_errors=True)
    return final


def _complete(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / "state.json").is_file() and (d / "state.safetensors").is_file():
            steps.append(int(m.group(1)))
    return steps


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete `step-<N>` directory under `root`, or None. Temporary directories are ignored."""
    steps = _complete(Path(root))
    return Path(root) / f"step-{max(steps):08d}" if steps else None


def load_checkpoint(path: str | Path, optimizer: torch.optim.Optimizer) -> tuple[int, dict, dict]:
    """Restore optimizer and RNG states from `path`; returns (step, branch state dict, settings)."""
    path = Path(path)
    try:
        doc = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable training checkpoint ({e})") from None
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in doc["optim_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    _restore_rng(tensors, doc["python_rng"])
    branch = {k[len("branch."):]: v for k, v in tensors.items() if k.startswith("branch.")}
    return int(doc["step"]), branch, doc["settings"]


def export_released(loaded, branches, out_dir: str | Path, *, gate_threshold: float | None = None) -> Path:
    """Write base model + `branches` as a released-layout Q-Zoom checkpoint directory (atomically).

    Branch tensors are cast to the base model's dtype. `gate_threshold` sets the exported gate threshold
    (default: the loaded checkpoint's, else 0.1); the other Q-Zoom settings are the loaded checkpoint's.
    """
    model = loaded.model
    release = copy.deepcopy(branches).to(dtype=model.dtype, device=model.device)
    if gate_threshold is None:
        gate_threshold = loaded.checkpoint.gate_threshold if loaded.branches.has_gate else DEFAULT_GATE_THRESHOLD
    settings = dataclasses.replace(loaded.checkpoint, gate_threshold=float(gate_threshold))
    with atomic_dir(out_dir, "config.json") as tmp:
        save_released(model, loaded.processor, release, settings, tmp)
    return Path(out_dir)

"""The released Q-Zoom checkpoint format, as data: its config.json keys and its tensor names.

Released checkpoints (transformers 4.51.3) name the branches `model.twig_layers.*` (the SD-RPN),
`model.high_res_layers.*` and `model.high_res_head.*` (the gate), the vision tower `visual.*` and the
text trunk `model.layers.*`. Saved by transformers 5.x the branches sit under `model.language_model.`;
bare names are accepted too. Inside `QZoomBranches` they are `rpn_layers`, `gate_layers`, `gate_head`.
Loading (`model.py`) and every export (tiny models, training) go through this module, and only this
module knows the released names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

__all__ = ["CheckpointConfig", "CONFIG_KEYS", "BRANCH_KEYS", "LAYOUTS", "DEFAULT_GATE_THRESHOLD",
           "DEFAULT_ROI_THRESHOLD", "read_config", "config_json_keys", "write_config_keys",
           "branch_state_from_shards", "released_name", "released_state", "save_released", "describe"]

LAYOUTS = ("4.51", "5.x")
DEFAULT_GATE_THRESHOLD = 0.1  # tau_gate of the reference evaluator, when high_res_thresh is absent
DEFAULT_ROI_THRESHOLD = 0.1  # tau_roi of the reference evaluator, when roi_thresh is absent

# Released branch module -> ours, inside `QZoomBranches`.
_BRANCH_MODULES = {"twig_layers.": "rpn_layers.", "high_res_layers.": "gate_layers.", "high_res_head.": "gate_head."}
# Outer prefix a branch key carries: written per layout; read in this order (5.x first, then 4.51, bare).
_BRANCH_PREFIX = {"4.51": "model.", "5.x": "model.language_model."}
_READ_PREFIXES = ("model.language_model.", "language_model.", "model.", "")


@dataclass(frozen=True)
class CheckpointConfig:
    """A checkpoint's Q-Zoom settings (its config.json keys), in our names. Defaults: what an absent key means."""

    has_rpn: bool = False
    branch_layer: int | None = None  # K: both branches read the residual stream entering trunk layer K
    rpn_depth: int = 0
    roi_source: str = "qk"
    has_gate: bool = False
    gate_depth: int | None = None  # None: rpn_depth (the released convention for high_res_T)
    gate_threshold: float = DEFAULT_GATE_THRESHOLD
    reuse_src_pos: bool = False
    roi_threshold: float = DEFAULT_ROI_THRESHOLD
    min_pixels: int | None = None  # coarse budget it was trained at (OUR keys); None: the engine's default
    max_pixels: int | None = None


# The one list of Q-Zoom config.json keys: key -> CheckpointConfig field. Released keys, then our own.
CONFIG_KEYS = {
    "enable_twig": "has_rpn",
    "twig_K": "branch_layer",
    "twig_T": "rpn_depth",
    "roi_source": "roi_source",
    "enable_high_res": "has_gate",
    "high_res_K": "branch_layer",  # must equal twig_K: one trunk prefix serves both branches
    "high_res_T": "gate_depth",
    "high_res_thresh": "gate_threshold",
    "reuse_src_pos": "reuse_src_pos",
    "roi_thresh": "roi_threshold",
    "coarse_min_pixels": "min_pixels",
    "coarse_max_pixels": "max_pixels",
}
_RPN_KEYS = ("twig_K", "twig_T", "roi_thresh")
_GATE_KEYS = ("high_res_K", "high_res_T", "high_res_thresh")
# The keys that describe branches: a checkpoint without branch weights carries none of them.
BRANCH_KEYS = ("enable_twig", "roi_source", "enable_high_res", *_RPN_KEYS, *_GATE_KEYS)
_FIELD_TYPES = {"has_rpn": bool, "has_gate": bool, "reuse_src_pos": bool, "branch_layer": int, "rpn_depth": int,
                "gate_depth": int, "min_pixels": int, "max_pixels": int, "gate_threshold": float,
                "roi_threshold": float, "roi_source": str}


def read_config(raw: dict, overrides: dict | None = None) -> CheckpointConfig:
    """The Q-Zoom keys of a raw config.json dict (flat 4.51.3 layout, or nested under text_config).

    `overrides` replaces values by OUR field names (e.g. `{"rpn_depth": 1, "reuse_src_pos": True}`).
    """
    text = raw.get("text_config") or {}
    found = {key: raw[key] if key in raw else text[key] for key in CONFIG_KEYS if key in raw or key in text}
    found = {key: value for key, value in found.items() if value is not None}
    rpn_k, gate_k = found.get("twig_K"), found.get("high_res_K")
    if found.get("enable_twig") and found.get("enable_high_res") and None not in (rpn_k, gate_k) and rpn_k != gate_k:
        raise CheckpointError(f"twig_K ({rpn_k}) and high_res_K ({gate_k}) must be equal")
    values = {CONFIG_KEYS[key]: value for key, value in found.items() if key != "high_res_K"}
    if not found.get("enable_twig") and gate_k is not None:
        values["branch_layer"] = gate_k
    unknown = sorted(set(overrides or {}) - set(_FIELD_TYPES))
    if unknown:
        raise CheckpointError(f"unknown checkpoint config overrides: {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(_FIELD_TYPES))}")
    values.update(overrides or {})
    try:
        values = {name: _FIELD_TYPES[name](value) for name, value in values.items()}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"a Q-Zoom config.json value has the wrong type: {e}") from None
    config = CheckpointConfig(**values)
    if config.gate_depth is None:
        config = dataclasses.replace(config, gate_depth=config.rpn_depth)
    return config


def config_json_keys(config: CheckpointConfig) -> dict:
    """The config.json keys that describe `config` (an absent branch writes none of its own keys)."""
    values = dataclasses.asdict(config)
    skip = (() if config.has_rpn else _RPN_KEYS) + (() if config.has_gate else _GATE_KEYS)
    return {key: values[name] for key, name in CONFIG_KEYS.items()
            if key not in skip and values[name] is not None}


def write_config_keys(config_json: Path, config: CheckpointConfig) -> None:
    """Replace every Q-Zoom key of a config.json (top level and text_config) by those of `config`."""
    raw = json.loads(config_json.read_text())
    for holder in (raw, raw.get("text_config") or {}):
        for key in CONFIG_KEYS:
            holder.pop(key, None)
    raw.update(config_json_keys(config))
    config_json.write_text(json.dumps(raw, indent=2))


def _our_branch_name(key: str) -> str | None:
    for outer in _READ_PREFIXES:
        if not key.startswith(outer):
            continue
        inner = key[len(outer):]
        for released, ours in _BRANCH_MODULES.items():
            if inner.startswith(released):
                return ours + inner[len(released):]
    return None


def released_name(name: str, layout: str | None = None) -> str:
    """Our branch tensor name -> the released one: bare (`twig_layers.0.mlp.up_proj.weight`) or with the
    outer prefix of `layout`. Used for saving and to name tensors in errors as the files name them."""
    for released, ours in _BRANCH_MODULES.items():
        if name.startswith(ours):
            return (_BRANCH_PREFIX[layout] if layout else "") + released + name[len(ours):]
    raise ValueError(f"{name} is not a Q-Zoom branch tensor")


def _released_trunk_name(name: str, layout: str) -> str:
    """A 5.x trunk key (`model.visual.*`, `model.language_model.*`, `lm_head.*`) in `layout`."""
    if layout == "4.51":
        if name.startswith("model.visual."):
            return name[len("model."):]
        if name.startswith("model.language_model."):
            return "model." + name[len("model.language_model."):]
    return name


def branch_state_from_shards(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every branch tensor in the safetensors shards, keyed by its name inside `QZoomBranches`."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = _our_branch_name(key)
                if name is None:
                    continue
                if name in state:
                    raise CheckpointError(f"branch weight {name} appears twice (as {key} in {f.name})")
                state[name] = sf.get_tensor(key)
    return state


def released_state(model, branches, layout: str = "4.51") -> dict[str, torch.Tensor]:
    """Trunk + branch tensors under their released names. `branches` may be attached to `model` or not."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    attached = tuple(f"{name}." for name, child in model.named_children() if child is branches)
    state = {_released_trunk_name(k, layout): v.contiguous() for k, v in model.state_dict().items()
             if not k.startswith(attached)}
    for name, tensor in branches.state_dict().items():
        state[released_name(name, layout)] = tensor.contiguous()
    return state


def save_released(model, processor, branches, config: CheckpointConfig, out_dir: str | Path, *,
                  layout: str = "4.51") -> Path:
    """Write `model` + `branches` as a Q-Zoom checkpoint directory that `model.load_model` reads like an
    official one: base weights, branch tensors and config keys under their released names.

    `layout="4.51"`: the transformers 4.51.3 names the released checkpoints use; `"5.x"`: 5.x prefixes.
    `config` gives the non-structural keys (thresholds, `reuse_src_pos`, the coarse budget); the branch
    shape is read from `branches`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = released_state(model, branches, layout)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    write_config_keys(out / "config.json", describe(branches, config))
    return out


def describe(branches, config: CheckpointConfig = CheckpointConfig()) -> CheckpointConfig:
    """`config` with its branch shape replaced by that of `branches`."""
    return dataclasses.replace(config, has_rpn=branches.has_rpn, has_gate=branches.has_gate,
                               branch_layer=branches.branch_layer, rpn_depth=branches.rpn_depth,
                               gate_depth=branches.gate_depth)

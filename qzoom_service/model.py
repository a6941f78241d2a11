"""Load stock Qwen2.5-VL weights and attach the Q-Zoom branches read from the checkpoint shards.

Base weights go through `Qwen2_5_VLForConditionalGeneration.from_pretrained` (its conversion mapping
handles the 4.51.3 `visual.*` / `model.*` layout). The branch weights are then read from the safetensors
shards by name; released (4.51.3) and 5.x prefixes are both accepted. Q-Zoom config keys come from the
raw `config.json` (top level first, then `text_config`) and can be overridden.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from .config import TOKEN_PIXELS
from .errors import CheckpointError
from .gate import DEFAULT_CONFIDENCE_THRESHOLD
from .attention_roi import DEFAULT_ATTENTION_ROI_THRESHOLD
from .heads import QZoomBranches
from .preprocess import Processor

__all__ = ["LoadedModel", "load_model", "load_for_config", "branch_state_from_shards", "qzoom_keys", "BRANCH_PREFIXES"]

log = logging.getLogger(__name__)

BRANCH_PREFIXES = ("twig_layers.", "high_res_layers.", "high_res_head.")
# Outer prefixes a branch key may carry: 4.51.3 (`model.`), 5.x (`model.language_model.`), bare.
_OUTER = ("model.language_model.", "language_model.", "model.", "")
DEFAULT_MIN_PIXELS = 256 * TOKEN_PIXELS  # coarse budget when neither the engine config nor the checkpoint sets one
DEFAULT_MAX_PIXELS = 576 * TOKEN_PIXELS
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Qwen2_5_VLForConditionalGeneration
    processor: Processor
    branches: QZoomBranches
    model_id: str
    revision: str
    reuse_src_pos: bool
    default_gate_threshold: float
    default_roi_threshold: float
    # Coarse pixel budget the checkpoint was trained for (config.json `coarse_min_pixels` /
    # `coarse_max_pixels`, OUR keys); used when the engine config leaves the budget unset.
    default_min_pixels: int = DEFAULT_MIN_PIXELS
    default_max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def prefix_k(self) -> int:
        """Trunk layer where pass 1 stops: the branch point, or the middle layer for plain weights."""
        k = self.branches.branch_K
        return k if k is not None else self.model.config.text_config.num_hidden_layers // 2


def qzoom_keys(raw_config: dict) -> dict:
    """Q-Zoom keys from a raw config.json dict (flat 4.51.3 layout, or nested under text_config)."""
    text = raw_config.get("text_config") or {}
    names = ("enable_twig", "twig_K", "twig_T", "enable_high_res", "high_res_K", "high_res_T",
             "high_res_thresh", "reuse_src_pos", "roi_source", "roi_thresh", "coarse_min_pixels", "coarse_max_pixels")
    return {n: raw_config.get(n, text.get(n)) for n in names if n in raw_config or n in text}


def _resolve_file(path: str, name: str, revision: str | None = None) -> Path | None:
    local = Path(path)
    if local.is_dir():
        f = local / name
        return f if f.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def _shard_files(path: str, revision: str | None) -> list[Path]:
    index = _resolve_file(path, "model.safetensors.index.json", revision)
    if index is not None:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [_resolve_file(path, n, revision) for n in names]
    single = _resolve_file(path, "model.safetensors", revision)
    if single is None:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return [single]


def _branch_name(key: str) -> str | None:
    for outer in _OUTER:
        if key.startswith(outer) and key[len(outer):].startswith(BRANCH_PREFIXES):
            return key[len(outer):]
    return None


def branch_state_from_shards(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every twig/high_res tensor in the shards, keyed by its name inside `QZoomBranches`."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = _branch_name(key)
                if name is None:
                    continue
                if name in state:
                    raise CheckpointError(f"branch weight {name} appears twice (as {key} in {f.name})")
                state[name] = sf.get_tensor(key)
    return state


def _load_branch_state(branches: QZoomBranches, state: dict[str, torch.Tensor], source: str) -> None:
    expected = branches.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped: {'; '.join(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: Q-Zoom branch weights do not match the config ({' | '.join(problems)})")
    branches.load_state_dict(state, strict=True)


def build_branches(text_config, keys: dict) -> QZoomBranches:
    if keys.get("roi_source", "qk") != "qk":
        raise CheckpointError(f"roi_source={keys['roi_source']!r} is not supported (only 'qk', the released setting)")
    twig_K = keys.get("twig_K") if keys.get("enable_twig") else None
    gate = keys.get("enable_high_res") and twig_K is not None
    try:
        return QZoomBranches.create(
            text_config,
            twig_K=twig_K,
            twig_T=int(keys.get("twig_T") or 0),
            gate_K=keys.get("high_res_K", twig_K) if gate else None,
            gate_T=int(keys.get("high_res_T", keys.get("twig_T")) or 0) if gate else 0,
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_model(
    path: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    overrides: dict | None = None,
) -> LoadedModel:
    """Load a Q-Zoom checkpoint or plain Qwen2.5-VL weights (local dir or hub id).

    `overrides` replaces config keys (`twig_K`, `twig_T`, `high_res_K`, `high_res_T`, `high_res_thresh`,
    `reuse_src_pos`, `enable_twig`, `enable_high_res`). Missing or mis-shaped branch keys raise
    `CheckpointError` naming them.
    """
    config_file = _resolve_file(path, "config.json", revision)
    if config_file is None:
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory or hub id?)")
    keys = {**qzoom_keys(json.loads(config_file.read_text())), **(overrides or {})}
    torch_dtype = _DTYPES[dtype]
    with _quiet_transformers():  # the branch keys are reported "unexpected"; we load them ourselves below
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, revision=revision
        ).eval()
    if _resolve_file(path, "generation_config.json", revision) is None:
        model.generation_config = GenerationConfig(eos_token_id=model.config.text_config.eos_token_id)
    branches = build_branches(model.config.text_config, keys)
    if branches.has_twig or branches.has_gate:
        _load_branch_state(branches, branch_state_from_shards(_shard_files(path, revision)), path)
    else:
        log.info("%s has no Q-Zoom branches: auto mode uses the training-free attention RoI and confidence gate", path)
    branches.to(device=device, dtype=torch_dtype).eval()
    model.to(device)
    return LoadedModel(
        model=model,
        processor=Processor.load(path),
        branches=branches,
        model_id=path,
        revision=revision or _local_revision(path),
        reuse_src_pos=bool(keys.get("reuse_src_pos", False)),
        default_gate_threshold=float(keys.get("high_res_thresh") or 0.1) if branches.has_gate
        else DEFAULT_CONFIDENCE_THRESHOLD,
        default_roi_threshold=float(keys.get("roi_thresh") or 0.1) if branches.has_twig
        else DEFAULT_ATTENTION_ROI_THRESHOLD,
        default_min_pixels=int(keys.get("coarse_min_pixels") or DEFAULT_MIN_PIXELS),
        default_max_pixels=int(keys.get("coarse_max_pixels") or DEFAULT_MAX_PIXELS),
    )


@contextmanager
def _quiet_transformers():
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _local_revision(path: str) -> str:
    """A content-derived revision for local directories (config + shard sizes/mtimes), else 'main'."""
    local = Path(path)
    if not local.is_dir():
        return "main"
    import hashlib

    h = hashlib.sha256()
    for f in sorted(local.glob("*.json")) + sorted(local.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


EMBEDDED_MODEL_DIR = Path(__file__).parent / "assets" / "qzoom-synth-tiny"


def load_for_config(config) -> LoadedModel:
    """The model an `EngineConfig` names; with `model=None` the embedded default.

    The embedded default is the project's small trained model when it ships in `assets/`, otherwise a
    tiny randomly initialised model (answers are then meaningless, and the log says so).
    """
    if config.model is not None:
        return load_model(config.model, device=config.device, dtype=config.dtype,
                          attn_implementation=config.attn_implementation)
    if (EMBEDDED_MODEL_DIR / "config.json").is_file():
        log.info("loading the embedded model %s", EMBEDDED_MODEL_DIR)
        return load_model(str(EMBEDDED_MODEL_DIR), device=config.device, dtype=config.dtype,
                          attn_implementation=config.attn_implementation)
    from .tiny import tiny_loaded

    log.warning("no --model given and no trained embedded model is packaged: using a tiny RANDOM model "
                "(answers are meaningless; pass --model Qwen/Qwen2.5-VL-7B-Instruct or a Q-Zoom checkpoint)")
    loaded = tiny_loaded(seed=0)
    loaded.model.to(config.device)
    loaded.branches.to(config.device)
    return loaded

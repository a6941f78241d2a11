"""Load stock Qwen2.5-VL weights and attach the Q-Zoom branches read from the checkpoint shards.

Base weights go through `Qwen2_5_VLForConditionalGeneration.from_pretrained` (its conversion mapping
handles the 4.51.3 `visual.*` / `model.*` layout). The branch weights and the Q-Zoom config.json keys
are read through `released.py`, which holds the released format; keys can be overridden.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging

from .attention_roi import DEFAULT_ATTENTION_ROI_THRESHOLD
from .config import EngineConfig
from .errors import CheckpointError
from .gate import DEFAULT_CONFIDENCE_THRESHOLD
from .heads import QZoomBranches
from .preprocess import Processor
from .released import CheckpointConfig, branch_state_from_shards, read_config, released_name

__all__ = ["LoadedModel", "load_model", "load_for_config", "build_branches", "tiny_random_loaded",
           "DEFAULT_COARSE_TOKENS"]

log = logging.getLogger(__name__)

# Coarse budget in merged tokens (paper's Doc/OCR setting) when neither the engine config nor the
# checkpoint sets one; pixels = tokens x factor^2 of the loaded model.
DEFAULT_COARSE_TOKENS = (256, 576)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Qwen2_5_VLForConditionalGeneration
    processor: Processor
    branches: QZoomBranches
    model_id: str
    revision: str
    checkpoint: CheckpointConfig = CheckpointConfig()  # the checkpoint's Q-Zoom config.json keys

    @property
    def branch_layer(self) -> int:
        """Trunk layer where pass 1 stops: the branch point, or the middle layer for plain weights."""
        k = self.branches.branch_layer
        return k if k is not None else self.model.config.text_config.num_hidden_layers // 2

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    @property
    def factor(self) -> int:
        """Side in pixels of the model-input square that one merged visual token covers (28 for Qwen2.5-VL)."""
        return self.patch_size * self.merge_size

    def resolve(self, config: EngineConfig) -> EngineConfig:
        """`config` with every setting it leaves to the checkpoint filled in (a frozen, validated copy).

        The gate and RoI thresholds are the trained branches' (config.json, else 0.1), or those of the
        training-free rules for plain weights; the coarse budget is the checkpoint's, else 256..576 tokens.
        """
        ckpt = self.checkpoint
        lo, hi = (tokens * self.factor**2 for tokens in DEFAULT_COARSE_TOKENS)
        return config.resolve(
            gate_threshold=ckpt.gate_threshold if self.branches.has_gate else DEFAULT_CONFIDENCE_THRESHOLD,
            roi_threshold=ckpt.roi_threshold if self.branches.has_rpn else DEFAULT_ATTENTION_ROI_THRESHOLD,
            min_pixels=ckpt.min_pixels or lo,
            max_pixels=ckpt.max_pixels or hi,
            reuse_src_pos=ckpt.reuse_src_pos,
            factor=self.factor,
        )


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


def _load_branch_state(branches: QZoomBranches, state: dict[str, torch.Tensor], source: str) -> None:
    expected = branches.state_dict()
    # Named as the checkpoint files name them.
    missing = sorted(released_name(k) for k in set(expected) - set(state))
    unexpected = sorted(released_name(k) for k in set(state) - set(expected))
    shapes = [f"{released_name(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
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


def build_branches(text_config, checkpoint: CheckpointConfig) -> QZoomBranches:
    """Empty branch modules of the shape `checkpoint` describes (a gate needs the SD-RPN's branch layer)."""
    if checkpoint.roi_source != "qk":
        raise CheckpointError(f"roi_source={checkpoint.roi_source!r} is not supported (only 'qk', the released setting)")
    if not checkpoint.has_rpn or checkpoint.branch_layer is None:
        return QZoomBranches.create(text_config)
    if checkpoint.rpn_depth < 1 or (checkpoint.has_gate and checkpoint.gate_depth < 1):
        raise CheckpointError(f"Q-Zoom branches need depth >= 1; got rpn_depth={checkpoint.rpn_depth}, "
                              f"gate_depth={checkpoint.gate_depth}")
    try:
        return QZoomBranches.create(text_config, branch_layer=checkpoint.branch_layer,
                                    rpn_depth=checkpoint.rpn_depth,
                                    gate_depth=checkpoint.gate_depth if checkpoint.has_gate else 0)
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

    `overrides` replaces Q-Zoom config keys by their `CheckpointConfig` names (`rpn_depth`,
    `gate_threshold`, `reuse_src_pos`, ...). Missing or mis-shaped branch keys raise `CheckpointError`
    naming them.
    """
    config_file = _resolve_file(path, "config.json", revision)
    if config_file is None:
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory or hub id?)")
    checkpoint = read_config(json.loads(config_file.read_text()), overrides)
    torch_dtype = _DTYPES[dtype]
    with _quiet_transformers():  # the branch keys are reported "unexpected"; we load them ourselves below
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, revision=revision
        ).eval()
    if _resolve_file(path, "generation_config.json", revision) is None:
        model.generation_config = GenerationConfig(eos_token_id=model.config.text_config.eos_token_id)
    branches = build_branches(model.config.text_config, checkpoint)
    if branches.has_rpn or branches.has_gate:
        _load_branch_state(branches, branch_state_from_shards(_shard_files(path, revision)), path)
    else:
        log.info("%s has no Q-Zoom branches: auto mode uses the training-free attention RoI and confidence gate", path)
    branches.to(device=device, dtype=torch_dtype).eval()
    model.to(device)
    processor = Processor.load(path)
    vision = model.config.vision_config
    if (processor.patch_size, processor.merge_size) != (vision.patch_size, vision.spatial_merge_size):
        raise CheckpointError(f"{path}: the image processor's patch/merge size ({processor.patch_size}, "
                              f"{processor.merge_size}) differ from the vision config's ({vision.patch_size}, "
                              f"{vision.spatial_merge_size})")
    return LoadedModel(
        model=model,
        processor=processor,
        branches=branches,
        model_id=path,
        revision=revision or _local_revision(path),
        checkpoint=checkpoint,
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
    config.check_device()
    if config.model is not None:
        return load_model(config.model, device=config.device, dtype=config.dtype,
                          attn_implementation=config.attn_implementation)
    if (EMBEDDED_MODEL_DIR / "config.json").is_file():
        log.info("loading the embedded model %s", EMBEDDED_MODEL_DIR)
        return load_model(str(EMBEDDED_MODEL_DIR), device=config.device, dtype=config.dtype,
                          attn_implementation=config.attn_implementation)
    log.warning("no --model given and no trained embedded model is packaged: using a tiny RANDOM model "
                "(answers are meaningless; pass --model Qwen/Qwen2.5-VL-7B-Instruct or a Q-Zoom checkpoint)")
    loaded = tiny_random_loaded(seed=0)
    loaded.model.to(config.device)
    loaded.branches.to(config.device)
    return loaded


def tiny_random_loaded(seed: int = 0, spec=None) -> LoadedModel:
    """A `LoadedModel` around `tiny.build_tiny(seed, spec)`, without touching the disk."""
    from .tiny import TinySpec, build_tiny

    model, processor = build_tiny(seed, spec or TinySpec())
    return LoadedModel(model=model, processor=processor, branches=model.qzoom,
                       model_id=f"qzoom-tiny-random-seed{seed}", revision="0",
                       checkpoint=read_config(model.config.to_dict()))

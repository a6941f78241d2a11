"""One typed configuration for the engine, built from CLI flags, `QZOOM_*` variables or a dict.

Defaults follow the paper's Doc/OCR setting on Qwen2.5-VL (coarse budget 256..576 merged tokens,
tau_gate and tau_roi 0.1 as in the reference evaluator), except where a checkpoint's `config.json`
says otherwise (`high_res_thresh`, `reuse_src_pos`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from .errors import InvalidInput

__all__ = ["EngineConfig", "RequestOptions", "MODES", "TOKEN_PIXELS"]

TOKEN_PIXELS = 28 * 28  # pixels of the model-input image per merged visual token
MODES = ("auto", "direct", "zoom")


@dataclass(frozen=True)
class RequestOptions:
    """Per-request knobs. `None` means "the engine's default"."""

    mode: str = "auto"
    gate_threshold: float | None = None
    roi_threshold: float | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    zoom_min_pixels: int | None = None
    zoom_max_pixels: int | None = None
    max_new_tokens: int | None = None
    prompt_suffix: str = ""
    repetition_penalty: float | None = None

    def validate(self) -> "RequestOptions":
        if self.mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name in ("gate_threshold", "roi_threshold"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise InvalidInput(f"{name} must be a probability in [0, 1]; got {v!r}")
        _check_budget("min_pixels/max_pixels", self.min_pixels, self.max_pixels)
        _check_budget("zoom_min_pixels/zoom_max_pixels", self.zoom_min_pixels, self.zoom_max_pixels)
        if self.max_new_tokens is not None and not (1 <= self.max_new_tokens <= 4096):
            raise InvalidInput(f"max_new_tokens must be in [1, 4096]; got {self.max_new_tokens}")
        if self.repetition_penalty is not None and not (
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0
        ):
            raise InvalidInput(f"repetition_penalty must be > 0; got {self.repetition_penalty}")
        return self


def _check_budget(name: str, lo: int | None, hi: int | None) -> None:
    for v in (lo, hi):
        if v is not None and not (TOKEN_PIXELS <= v <= 16384 * TOKEN_PIXELS):
            raise InvalidInput(
                f"{name} must be between {TOKEN_PIXELS} (1 token) and {16384 * TOKEN_PIXELS} pixels; got {v}"
            )
    if lo is not None and hi is not None and lo > hi:
        raise InvalidInput(f"{name}: minimum {lo} is larger than maximum {hi}")


@dataclass(frozen=True)
class EngineConfig:
    """Load-time settings of one engine. Built once; unknown keys are rejected."""

    model: str | None = None  # checkpoint dir or hub id; None = the embedded default model
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    gate_threshold: float | None = None  # None: the checkpoint's high_res_thresh, else 0.1
    roi_threshold: float | None = None  # None: 0.1 for the SD-RPN, 0.5 for the training-free map
    min_pixels: int | None = None  # None: the checkpoint's coarse_min_pixels, else 256 tokens
    max_pixels: int | None = None  # None: the checkpoint's coarse_max_pixels, else 576 tokens
    zoom_min_pixels: int | None = None  # None: same budget as the coarse view (the reference)
    zoom_max_pixels: int | None = None
    max_new_tokens: int = 128
    reuse_src_pos: bool | None = None  # None: the checkpoint's config.json
    max_image_pixels: int = 64_000_000  # decompression-bomb guard on the decoded original
    max_image_bytes: int = 32 * 1024 * 1024
    max_question_chars: int = 4000
    max_batch_size: int = 8
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidInput(f"dtype must be float32, bfloat16 or float16; got {self.dtype!r}")
        RequestOptions(
            gate_threshold=self.gate_threshold,
            roi_threshold=self.roi_threshold,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            zoom_min_pixels=self.zoom_min_pixels,
            zoom_max_pixels=self.zoom_max_pixels,
            max_new_tokens=self.max_new_tokens,
        ).validate()
        if self.max_image_pixels < 1 or self.max_image_bytes < 1:
            raise InvalidInput("max_image_pixels and max_image_bytes must be positive")

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidInput(f"unknown engine config keys: {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> "EngineConfig":
        """Read `QZOOM_<FIELD>` variables (e.g. QZOOM_DEVICE=cuda), then apply non-None overrides."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"QZOOM_{f.name.upper()}")
            if raw is not None and f.name != "extra":
                values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)


def _parse(type_name, raw: str, name: str):
    t = str(type_name)
    try:
        if t.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
    except ValueError:
        raise InvalidInput(f"QZOOM_{name.upper()}={raw!r} is not a valid {t}") from None
    return raw

"""One typed configuration for the engine, built from CLI flags, `QZOOM_*` variables or a dict.

Defaults follow the paper's Doc/OCR setting on Qwen2.5-VL (coarse budget 256..576 merged tokens,
tau_gate and tau_roi 0.1 as in the reference evaluator), except where a checkpoint's `config.json`
says otherwise. Settings left `None` are the checkpoint's; `LoadedModel.resolve` fills them once, when
an engine is built, into a frozen copy (`EngineConfig.resolve`). Pixel budgets are checked against the
model's merged-token size (`factor`) there, since only the model knows it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInput, LimitExceeded

__all__ = ["EngineConfig", "RequestOptions", "MODES", "MAX_BUDGET_TOKENS", "check_visual_budget"]

MODES = ("auto", "direct", "zoom")
MAX_BUDGET_TOKENS = 16384  # largest pixel budget, in merged tokens (the qwen-vl-utils bound)
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


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

    def validate(self, factor: int | None = None) -> "RequestOptions":
        """Check every set value; pixel budgets against `factor` (pixels per merged-token side) when given."""
        if self.mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name in ("gate_threshold", "roi_threshold"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise InvalidInput(f"{name} must be a probability in [0, 1]; got {v!r}")
        _check_budget("min_pixels/max_pixels", self.min_pixels, self.max_pixels, factor)
        _check_budget("zoom_min_pixels/zoom_max_pixels", self.zoom_min_pixels, self.zoom_max_pixels, factor)
        if self.max_new_tokens is not None and not (1 <= self.max_new_tokens <= 4096):
            raise InvalidInput(f"max_new_tokens must be in [1, 4096]; got {self.max_new_tokens}")
        if self.repetition_penalty is not None and not (
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0
        ):
            raise InvalidInput(f"repetition_penalty must be > 0; got {self.repetition_penalty}")
        return self


def _check_budget(name: str, lo: int | None, hi: int | None, factor: int | None) -> None:
    # Without the model's factor only the sign can be checked; the range is checked at resolve time.
    low, high = (factor * factor, MAX_BUDGET_TOKENS * factor * factor) if factor else (1, None)
    for v in (lo, hi):
        if v is not None and not (low <= v and (high is None or v <= high)):
            if high is None:
                raise InvalidInput(f"{name} must be a positive number of pixels; got {v}")
            raise InvalidInput(f"{name} must be between {low} (1 token) and {high} pixels; got {v}")
    if lo is not None and hi is not None and lo > hi:
        raise InvalidInput(f"{name}: minimum {lo} is larger than maximum {hi}")


def check_visual_budget(options, config: "EngineConfig", factor: int) -> None:
    """Refuse a maximum budget (`max_pixels`, `zoom_max_pixels`) over `config.max_visual_tokens` merged tokens."""
    cap = config.max_visual_tokens * factor * factor
    for name in ("max_pixels", "zoom_max_pixels"):
        value = getattr(options, name)
        if value is not None and value > cap:
            raise LimitExceeded(f"{name}={value} pixels is {value // (factor * factor)} visual tokens; the server's "
                                f"max_visual_tokens is {config.max_visual_tokens} ({cap} pixels)")


@dataclass(frozen=True)
class EngineConfig:
    """Load-time settings of one engine. Built once; unknown keys are rejected."""

    model: str | None = None  # checkpoint dir or hub id; None = the embedded default model
    device: str = "cpu"  # cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    gate_threshold: float | None = None  # None: the checkpoint's (else 0.1), 0.5 for the confidence rule
    roi_threshold: float | None = None  # None: the checkpoint's (else 0.1), 0.5 for the training-free map
    min_pixels: int | None = None  # None: the checkpoint's coarse budget, else 256 tokens
    max_pixels: int | None = None  # None: the checkpoint's coarse budget, else 576 tokens
    zoom_min_pixels: int | None = None  # None: same budget as the coarse view (the reference)
    zoom_max_pixels: int | None = None
    max_new_tokens: int = 128
    reuse_src_pos: bool | None = None  # None: the checkpoint's config.json
    max_image_pixels: int = 64_000_000  # decompression-bomb guard on the decoded original
    max_image_bytes: int = 32 * 1024 * 1024
    max_question_chars: int = 4000
    max_batch_size: int = 8
    # The cost model (checked in `preprocess.prepare`, before any model work).
    max_prompt_tokens: int = 2048  # tokens of question + prompt_suffix, as the checkpoint's tokenizer counts
    max_visual_tokens: int = 4096  # merged visual tokens of one view: caps max_pixels and zoom_max_pixels
    # Enlarging an image past its own pixel count to a requested minimum budget costs tokens and shows nothing
    # new; off: a request's minimum is lowered to the larger of the image's pixels and this engine's minimum.
    allow_upscale: bool = False
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidInput(f"dtype must be float32, bfloat16 or float16; got {self.dtype!r}")
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise InvalidInput(f"device must be cpu, cuda, cuda:N or mps; got {self.device!r}")
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
        if self.max_batch_size < 1:
            raise InvalidInput(f"max_batch_size must be >= 1; got {self.max_batch_size}")
        if self.max_prompt_tokens < 1 or not (1 <= self.max_visual_tokens <= MAX_BUDGET_TOKENS):
            raise InvalidInput(f"max_prompt_tokens must be >= 1 and max_visual_tokens in [1, {MAX_BUDGET_TOKENS}]; "
                               f"got {self.max_prompt_tokens} and {self.max_visual_tokens}")

    def resolve(self, *, gate_threshold: float, roi_threshold: float, min_pixels: int, max_pixels: int,
                reuse_src_pos: bool, factor: int) -> "EngineConfig":
        """A copy with every `None` the model decides filled from these defaults, validated against the
        model's `factor` (pixels per merged-token side). Called once per engine (`LoadedModel.resolve`)."""
        def pick(value, default):
            return default if value is None else value

        resolved = dataclasses.replace(
            self,
            gate_threshold=pick(self.gate_threshold, gate_threshold),
            roi_threshold=pick(self.roi_threshold, roi_threshold),
            min_pixels=self.min_pixels or min_pixels,
            max_pixels=self.max_pixels or max_pixels,
            reuse_src_pos=pick(self.reuse_src_pos, reuse_src_pos),
        )
        RequestOptions(min_pixels=resolved.min_pixels, max_pixels=resolved.max_pixels,
                       zoom_min_pixels=resolved.zoom_min_pixels,
                       zoom_max_pixels=resolved.zoom_max_pixels).validate(factor)
        check_visual_budget(resolved, resolved, factor)
        return resolved

    def check_device(self) -> None:
        """Fail early, with the key and what is allowed, when `device` names a GPU this machine lacks.

        Cheap before torch is imported (looks for the NVIDIA driver), exact after (asks torch).
        """
        if not self.device.startswith("cuda"):
            return
        torch = sys.modules.get("torch")
        has_cuda = torch.cuda.is_available() if torch is not None else nvidia_driver_present()
        if not has_cuda:
            raise InvalidInput(f"device={self.device!r} needs a CUDA GPU and this machine has none "
                               "(no usable NVIDIA driver); allowed here: cpu")

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
        values = cls.env_values(environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def env_values(cls, environ=os.environ) -> dict:
        """The fields set by `QZOOM_<FIELD>` variables, parsed."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f"QZOOM_{f.name.upper()}")
            if raw is not None and f.name != "extra":
                values[f.name] = _parse(f.type, raw, f.name)
        return values

    def to_dict(self) -> dict:
        """The settings `from_dict` reads back (no `extra`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is loaded here (no torch import: this must stay fast)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


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

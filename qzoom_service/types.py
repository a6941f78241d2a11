"""Small dataclasses passed between pipeline stages and returned by the engine."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from .config import RequestOptions

__all__ = ["Request", "Result", "Prepared", "CoarseState", "Box"]

Box = tuple[int, int, int, int]  # (x1, y1, x2, y2), pixels of the original image, end exclusive


@dataclass
class Request:
    """One question about one image. `image` is a PIL image or encoded bytes (PNG, JPEG, ...)."""

    image: Image.Image | bytes
    question: str
    options: RequestOptions = field(default_factory=RequestOptions)
    image_id: str | None = None  # content hash of the bytes; enables the coarse-feature cache


@dataclass
class Prepared:
    """A validated request, tokenized and resized for the coarse pass (batch of one)."""

    original: Image.Image  # RGB, untouched: crops are taken from here
    input_ids: torch.Tensor  # (1, L) long
    pixel_values: torch.Tensor  # (patches, C*t*p*p)
    grid_thw: torch.Tensor  # (1, 3) patch grid of the coarse image
    options: RequestOptions  # with every default filled in
    patch_size: int  # pixels per patch side of the checkpoint's vision tower
    merge_size: int  # patches per merged-token side
    image_id: str | None = None  # content hash, for the coarse-feature cache

    @property
    def merged_hw(self) -> tuple[int, int]:
        """(rows, cols) of the merged-token grid of the coarse image."""
        return int(self.grid_thw[0, 1]) // self.merge_size, int(self.grid_thw[0, 2]) // self.merge_size

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) in pixels of the model-input (resized) coarse image."""
        return int(self.grid_thw[0, 2]) * self.patch_size, int(self.grid_thw[0, 1]) * self.patch_size


@dataclass
class CoarseState:
    """Everything pass 1 leaves behind for the gate, the RPN, the zoom and decoding."""

    embeds: torch.Tensor  # (1, L, D) layer-0 inputs with image features scattered in
    positions: torch.Tensor  # (3, 1, L) M-RoPE positions
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin (3-axis recomposed)
    h_k: torch.Tensor  # (1, L, D) residual stream after trunk layers 0..K-1
    cache: object  # DynamicCache holding layers 0..K-1 for all L tokens
    branch_layer: int  # K: pass 1 ran trunk layers 0..K-1
    image_start: int  # sequence index of the first <|image_pad|>
    num_visual: int  # Nv merged tokens of the coarse image


@dataclass
class Result:
    """What the engine returns for one request."""

    answer: str
    route: str  # "direct" | "zoom"
    gate_score: float | None  # probability that zooming is needed; None when the mode forced the route
    roi_map: list[list[float]] | None  # per merged-token cell foreground probability, (Hm rows, Wm cols)
    roi_box: Box | None  # in original-image pixels
    visual_tokens: dict[str, int]  # {"coarse": Nv, "zoom": M}
    generated_ids: list[int]
    timings_ms: dict[str, float]
    original_size: tuple[int, int]  # (width, height)
    input_size: tuple[int, int]  # (width, height) of the coarse model-input image
    roi_source: str | None = None  # "sd_rpn" | "attention" | "explicit" | None
    cache_hit: bool = False  # the coarse vision features came from the feature cache

    def to_json(self) -> dict:
        return {
            "answer": self.answer,
            "route": self.route,
            "gate_score": self.gate_score,
            "roi_box": list(self.roi_box) if self.roi_box else None,
            "roi_map": self.roi_map,
            "roi_source": self.roi_source,
            "cache_hit": self.cache_hit,
            "visual_tokens": dict(self.visual_tokens),
            "generated_ids": list(self.generated_ids),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "original_size": list(self.original_size),
            "input_size": list(self.input_size),
        }

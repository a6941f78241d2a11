"""The Q-Zoom engine: wires the stages, nothing else.

    preprocess -> coarse (vision + layers 0..K-1) -> gate -> rpn (map -> box) -> zoom (crop, re-encode,
    fused prefill reusing the prefix cache) or the plain prefill -> greedy decode

`answer` takes a batch. Requests are validated and decoded first (a bad one raises before any model
work), the coarse images of the whole batch go through the vision tower in one call, and the language
model then runs request by request (batch 1), which keeps each item bit-compatible with a single call.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch

from . import attention_roi, decode, gate, rpn, zoom
from .coarse import encode_images, prefill_to_k
from .config import EngineConfig
from .errors import InvalidInput
from .model import LoadedModel
from .preprocess import prepare
from .types import CoarseState, Prepared, Request, Result

__all__ = ["QZoomEngine"]

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + (time.perf_counter() - start) * 1000.0


class QZoomEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.model = loaded.model
        self.processor = loaded.processor
        self.branches = loaded.branches
        self.reuse_src_pos = (
            loaded.reuse_src_pos if self.config.reuse_src_pos is None else self.config.reuse_src_pos
        )
        self.default_gate = (
            self.config.gate_threshold if self.config.gate_threshold is not None else loaded.default_gate_threshold
        )
        self.default_roi = (
            self.config.roi_threshold if self.config.roi_threshold is not None else loaded.default_roi_threshold
        )

    # -- public -------------------------------------------------------------------------------------

    def prepare(self, request: Request) -> Prepared:
        """Validate and preprocess one request (no model work). Raises `InvalidInput` / `ImageTooLarge`."""
        return prepare(request, self.processor, self.config, self.default_gate, self.default_roi)

    @torch.inference_mode()
    def answer(self, requests: list[Request]) -> list[Result]:
        if not requests:
            return []
        if len(requests) > self.config.max_batch_size:
            raise InvalidInput(f"batch of {len(requests)} exceeds max_batch_size={self.config.max_batch_size}")
        prepared, prep_ms = [], []
        for i, request in enumerate(requests):
            start = time.perf_counter()
            try:
                prepared.append(self.prepare(request))
            except InvalidInput as e:
                raise type(e)(f"request {i}: {e.message}" if len(requests) > 1 else e.message) from None
            prep_ms.append((time.perf_counter() - start) * 1000.0)
        start = time.perf_counter()
        embeds = encode_images(
            self.model,
            torch.cat([p.pixel_values for p in prepared]),
            torch.cat([p.grid_thw for p in prepared]),
        )
        vision_ms = (time.perf_counter() - start) * 1000.0 / len(prepared)
        return [
            self._answer_one(p, e, {"preprocess": ms, "vision_coarse": vision_ms})
            for p, e, ms in zip(prepared, embeds, prep_ms)
        ]

    @torch.inference_mode()
    def answer_with_box(self, request: Request, box: tuple[float, float, float, float]) -> Result:
        """Zoomed re-decode with an explicit box in original pixels (`ZoomRegion` with a question)."""
        timings: dict[str, float] = {}
        with _timed(timings, "preprocess"):
            p = self.prepare(request)
        with _timed(timings, "vision_coarse"):
            (image_embeds,) = encode_images(self.model, p.pixel_values, p.grid_thw)
        with _timed(timings, "prefill_k"):
            state = prefill_to_k(self.model, p, image_embeds, self.loaded.prefix_k)
        w0, h0 = p.original.size
        int_box = (max(0, int(box[0])), max(0, int(box[1])), min(w0, int(round(box[2]))), min(h0, int(round(box[3]))))
        cell_box = rpn.original_to_cell_box(int_box, p.merged_hw, p.original.size)
        result = self._zoom(p, state, int_box, cell_box, timings)
        if result is None:
            raise InvalidInput(f"box {list(int_box)} is smaller than 28 px on a side after clamping to the image")
        return self._result(p, state, route="zoom", gate_score=None, prob=None, box=int_box,
                            roi_source="explicit", timings=timings, **result)

    # -- one request ----------------------------------------------------------------------------------

    def _answer_one(self, p: Prepared, image_embeds: torch.Tensor, timings: dict) -> Result:
        mode = p.options.mode
        with _timed(timings, "prefill_k"):
            state = prefill_to_k(self.model, p, image_embeds, self.loaded.prefix_k)
        score, direct_hidden = None, None
        if mode == "auto":
            with _timed(timings, "gate"):
                if self.branches.has_gate:
                    score = gate.trained_gate_score(self.branches, state)
                else:  # confidence rule needs the direct prefill, which the direct route then reuses
                    direct_hidden = decode.finish_prefill(self.model, state)
                    score = gate.confidence_gate_score(self.model.lm_head(direct_hidden))
        want_zoom = mode == "zoom" or (mode == "auto" and score >= p.options.gate_threshold)
        if want_zoom:
            # The zoom copies the layer 0..K-1 prefix cache, so a failed zoom leaves the direct route intact.
            with _timed(timings, "rpn"):
                prob, source = self._roi_probability(p, state, image_embeds)
                cell_box, box = rpn.map_to_box(prob, p.options.roi_threshold, p.original.size,
                                               relative=source == "attention")
            zoomed = self._zoom(p, state, box, cell_box, timings) if box is not None else None
            if zoomed is not None:
                return self._result(p, state, route="zoom", gate_score=score, prob=prob, box=box,
                                    roi_source=source, timings=timings, **zoomed)
            log.debug("zoom wanted but no RoI (empty map or crop < 28 px): direct answer")
        return self._direct(p, state, score, direct_hidden, timings)

    def _direct(self, p: Prepared, state: CoarseState, score, hidden, timings) -> Result:
        if hidden is None:
            with _timed(timings, "prefill_rest"):
                hidden = decode.finish_prefill(self.model, state)
        with _timed(timings, "decode"):
            ids = decode.greedy_decode(
                self.model, hidden, state.cache, state.positions[:, :, -1:], p.input_ids,
                p.options.max_new_tokens, p.options.repetition_penalty,
            )
        return self._result(p, state, route="direct", gate_score=score, prob=None, box=None, roi_source=None,
                            timings=timings, generated=ids, num_roi=0)

    def _roi_probability(self, p: Prepared, state: CoarseState, image_embeds) -> tuple[torch.Tensor, str]:
        if self.branches.has_twig:
            return torch.sigmoid(rpn.roi_logits(self.branches, state, p.merged_hw).float()), "sd_rpn"
        generic = Prepared(
            original=p.original,
            input_ids=self.processor.prompt_ids(attention_roi.GENERIC_PROMPT, state.num_visual),
            pixel_values=p.pixel_values, grid_thw=p.grid_thw, options=p.options,
        )
        generic_state = prefill_to_k(self.model, generic, image_embeds, state.k)
        return attention_roi.attention_map(self.model, state, generic_state, p.merged_hw), "attention"

    def _zoom(self, p: Prepared, state: CoarseState, box, cell_box, timings) -> dict | None:
        with _timed(timings, "zoom_encode"):
            encoded = zoom.encode_crop(
                self.processor, p.original, box, p.options.zoom_min_pixels, p.options.zoom_max_pixels
            )
            if encoded is None:
                return None
            pixel_values, roi_grid = encoded
            (roi_embeds,) = encode_images(self.model, pixel_values, roi_grid)
        roi_hw = (int(roi_grid[0, 1]) // 2, int(roi_grid[0, 2]) // 2)
        with _timed(timings, "zoom_prefill"):
            zin = zoom.build_zoom_input(state, roi_embeds, p.merged_hw, roi_hw, cell_box, self.reuse_src_pos)
            hidden, cache = zoom.prefill_zoom(self.model, state, zin)
        with _timed(timings, "decode"):
            ids = decode.greedy_decode(
                self.model, hidden, cache, zin.positions[:, :, -1:], p.input_ids,
                p.options.max_new_tokens, p.options.repetition_penalty,
            )
        return {"generated": ids, "num_roi": zin.num_roi}

    def _result(self, p, state, *, route, gate_score, prob, box, roi_source, timings, generated, num_roi) -> Result:
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        return Result(
            answer=self.processor.tokenizer.decode(generated, skip_special_tokens=True).strip(),
            route=route,
            gate_score=gate_score,
            roi_map=prob.tolist() if prob is not None else None,
            roi_box=tuple(box) if box is not None else None,
            visual_tokens={"coarse": state.num_visual, "zoom": num_roi},
            generated_ids=generated,
            timings_ms=timings,
            original_size=p.original.size,
            input_size=p.input_size,
            roi_source=roi_source,
        )

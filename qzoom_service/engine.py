"""The Q-Zoom engine: wires the stages, nothing else.

    preprocess -> coarse (vision + layers 0..K-1) -> gate -> rpn (map -> box) -> zoom (crop, re-encode,
    fused prefill reusing the prefix cache) or the plain prefill -> greedy decode

Three entry points:
- `answer(requests)`: the whole pipeline in-process (CLI, tests, a single-deployment server).
- `route(requests)`: the cheap half for a coarse+gate server. Direct answers are decoded here; requests
  that need the zoom come back as a `ZoomPlan` (box, gate score, map) for a zoom server.
- `zoom(request, plan)`: the zoom half. It rebuilds the coarse prefix from the coarse vision features the
  plan carries (or, for an explicit box, the cached or freshly encoded ones) rather than receiving the
  layer 0..K-1 K/V over the network, then runs the fused prefill. A zoom server receives the prepared
  request (`for_zoom`: no coarse pixels) and the plan, so the image is decoded and encoded once.

Batches: requests are validated first (a bad one raises before any model work), the coarse images that
miss the feature cache go through the vision tower in one call, and pass 1 (trunk layers 0..K-1) runs
as one left-padded batch. The gate, the RPN, the zoom and decoding then run request by request, so each
item equals a single call up to floating-point summation order.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from . import attention_roi, decode, gate, rpn, zoom
from .cache import CoarseFeatures, FeatureKey
from .coarse import encode_images, prefill_batch_to_k, prefill_to_k
from .config import EngineConfig
from .errors import InvalidInput
from .geometry import fit_crop_box
from .model import LoadedModel
from .preprocess import prepare
from .types import CoarseState, Prepared, Request, Result

__all__ = ["QZoomEngine", "ZoomPlan", "for_zoom"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZoomPlan:
    """What the coarse pass hands to the zoom pass: the RoI and, from `route`, the coarse features (on the
    CPU, so the plan pickles to another process), which let the zoom pass skip the vision tower."""

    box: tuple[int, int, int, int]  # original-image pixels
    cell_box: tuple[int, int, int, int]  # merged-grid cells of the coarse image (for aligned positions)
    gate_score: float | None
    roi_map: list[list[float]] | None
    roi_source: str  # "sd_rpn" | "attention" | "explicit"
    timings_ms: tuple[tuple[str, float], ...] = ()  # of the coarse pass that made the plan
    cache_hit: bool | None = None  # whether that coarse pass found its features in the cache
    coarse: CoarseFeatures | None = None  # that pass's vision-tower output; None: the zoom pass gets its own


def for_zoom(p: Prepared) -> Prepared:
    """The request as the zoom pass needs it once its plan carries the coarse features: without the coarse
    pixel values, which only the vision tower reads (the largest part of a request after the image)."""
    return replace(p, pixel_values=p.pixel_values.new_empty((0, p.pixel_values.shape[-1])))


@contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + (time.perf_counter() - start) * 1000.0


class QZoomEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None, feature_cache=None):
        """`feature_cache`: optional object with `get_features(key)` / `put_features(key, features)` (see
        `cache.py`); used for requests that carry an `image_id`."""
        self.loaded = loaded
        # Every setting left to the checkpoint (thresholds, coarse budget, position scheme), filled once.
        self.config = loaded.resolve(config or EngineConfig())
        self.model = loaded.model
        self.processor = loaded.processor
        self.branches = loaded.branches
        self.feature_cache = feature_cache
        self.dtype_name = str(next(self.model.parameters()).dtype).removeprefix("torch.")

    # -- public -------------------------------------------------------------------------------------

    def prepare(self, request: Request) -> Prepared:
        """Validate and preprocess one request (no model work). Raises `InvalidInput` / `ImageTooLarge`."""
        return prepare(request, self.processor, self.config)

    @torch.inference_mode()
    def answer(self, requests: list[Request | Prepared]) -> list[Result]:
        out = []
        for p, embeds, timings, hit, state in self._coarse_states(requests):
            decision = self._decide(p, state, embeds, timings)
            result = self._zoom_result(p, state, decision, timings, hit) if isinstance(decision, ZoomPlan) else None
            out.append(result or self._direct(p, state, decision, timings, hit))
        return out

    @torch.inference_mode()
    def route(self, requests: list[Request | Prepared]) -> list[Result | ZoomPlan]:
        out = []
        for p, embeds, timings, hit, state in self._coarse_states(requests):
            decision = self._decide(p, state, embeds, timings)
            if isinstance(decision, ZoomPlan):
                coarse = CoarseFeatures(embeds=embeds.detach().cpu(), grid_thw=p.grid_thw)
                out.append(replace(decision, timings_ms=tuple(timings.items()), cache_hit=hit, coarse=coarse))
            else:
                out.append(self._direct(p, state, decision, timings, hit))
        return out

    @torch.inference_mode()
    def zoom(self, request: Request | Prepared, plan: ZoomPlan) -> Result:
        """Zoom pass for a plan from `route` (or an explicit box); rebuilds the coarse prefix first.

        With the plan's coarse features no vision tower runs here, and `cache_hit` is the coarse pass's (the
        only lookup made); without them this pass looks up or encodes its own and reports that.
        """
        if plan.coarse is None:
            ((p, embeds, timings, hit),) = self._coarse_batch([request])
        else:
            p, embeds, timings, hit = self._travelled(request, plan)
        for name, ms in plan.timings_ms:
            timings[f"coarse.{name}"] = ms
        with _timed(timings, "prefill_k"):
            state = prefill_to_k(self.model, p, embeds, self.loaded.branch_layer)
        return (self._zoom_result(p, state, plan, timings, hit)
                or self._direct(p, state, _Direct(plan.gate_score), timings, hit))

    def plan_for_box(self, request: Request | Prepared, box) -> ZoomPlan:
        """A `ZoomPlan` for an explicit box in original pixels (clamped, grown to >= one merged token per side)."""
        p = request if isinstance(request, Prepared) else self.prepare(request)
        factor = self.loaded.factor
        int_box = fit_crop_box(box, p.original.size, min_side=factor)
        if int_box[2] - int_box[0] < factor or int_box[3] - int_box[1] < factor:
            raise InvalidInput(f"the image is under {factor} px on a side; there is nothing to zoom into")
        cell_box = rpn.original_to_cell_box(int_box, p.merged_hw, p.original.size)
        return ZoomPlan(box=int_box, cell_box=cell_box, gate_score=None, roi_map=None, roi_source="explicit")

    # -- stages -------------------------------------------------------------------------------------

    def _travelled(self, request: Request | Prepared, plan: ZoomPlan):
        """`_coarse_batch` for one request whose plan brought its coarse features."""
        timings: dict[str, float] = {}
        with _timed(timings, "preprocess"):
            p = request if isinstance(request, Prepared) else self.prepare(request)
        if not torch.equal(plan.coarse.grid_thw.cpu(), p.grid_thw.cpu()):
            raise ValueError(f"the plan's coarse features (grid {plan.coarse.grid_thw.tolist()}) are not of this "
                             f"request (grid {p.grid_thw.tolist()})")
        embeds = plan.coarse.embeds.to(device=self.model.device, dtype=self.model.dtype)
        return p, embeds, timings, bool(plan.cache_hit)

    def _coarse_batch(self, requests: list[Request | Prepared]):
        """-> [(prepared, coarse image embeddings (Nv, D), timings, cache hit)], from the cache where possible.

        Items may already be `Prepared` (a server validates each request before batching it).
        """
        if len(requests) > self.config.max_batch_size:
            raise InvalidInput(f"batch of {len(requests)} exceeds max_batch_size={self.config.max_batch_size}")
        prepared, timings = [], []
        for i, request in enumerate(requests):
            t: dict[str, float] = {}
            try:
                with _timed(t, "preprocess"):
                    prepared.append(request if isinstance(request, Prepared) else self.prepare(request))
            except InvalidInput as e:
                raise type(e)(f"request {i}: {e.message}" if len(requests) > 1 else e.message) from None
            timings.append(t)
        embeds = [self._cached_features(p) for p in prepared]
        missing = [i for i, e in enumerate(embeds) if e is None]
        if missing:
            start = time.perf_counter()
            encoded = encode_images(
                self.model,
                torch.cat([prepared[i].pixel_values for i in missing]),
                torch.cat([prepared[i].grid_thw for i in missing]),
            )
            share = (time.perf_counter() - start) * 1000.0 / len(missing)
            for i, e in zip(missing, encoded):
                embeds[i] = e
                timings[i]["vision_coarse"] = share
                self._store_features(prepared[i], e)
        hits = [i not in missing for i in range(len(prepared))]
        return list(zip(prepared, embeds, timings, hits))

    def _feature_key(self, p: Prepared):
        if self.feature_cache is None or p.image_id is None:
            return None
        return FeatureKey(image_id=p.image_id, model_id=self.loaded.model_id,
                          model_revision=self.loaded.revision, min_pixels=p.options.min_pixels,
                          max_pixels=p.options.max_pixels, dtype=self.dtype_name)

    def _cached_features(self, p: Prepared) -> torch.Tensor | None:
        key = self._feature_key(p)
        if key is None:
            return None
        hit = self.feature_cache.get_features(key)
        if hit is None or not torch.equal(hit.grid_thw.cpu(), p.grid_thw.cpu()):
            return None
        return hit.embeds.to(device=self.model.device, dtype=self.model.dtype)

    def _store_features(self, p: Prepared, embeds: torch.Tensor) -> None:
        key = self._feature_key(p)
        if key is not None:
            self.feature_cache.put_features(key, CoarseFeatures(embeds=embeds.detach().cpu(), grid_thw=p.grid_thw))

    def _coarse_states(self, requests):
        """`_coarse_batch` plus pass 1 for the whole batch in one left-padded forward."""
        items = self._coarse_batch(requests)
        start = time.perf_counter()
        states = prefill_batch_to_k(self.model, [i[0] for i in items], [i[1] for i in items],
                                    self.loaded.branch_layer)
        share = (time.perf_counter() - start) * 1000.0 / max(1, len(items))
        for item in items:
            item[2]["prefill_k"] = share
        return [(*item, state) for item, state in zip(items, states)]

    def _decide(self, p: Prepared, state: CoarseState, embeds: torch.Tensor, timings: dict):
        """The gate, then the RPN if it opens. -> ZoomPlan | _Direct."""
        mode = p.options.mode
        score, direct_hidden = None, None
        if mode == "auto":
            with _timed(timings, "gate"):
                if self.branches.has_gate:
                    score = gate.trained_gate_score(self.branches, state)
                else:  # the confidence rule needs the direct prefill, which the direct route then reuses
                    direct_hidden = decode.finish_prefill(self.model, state)
                    score = gate.confidence_gate_score(self.model.lm_head(direct_hidden))
        if mode == "direct" or (mode == "auto" and score < p.options.gate_threshold):
            return _Direct(score, direct_hidden)
        factor = self.loaded.factor
        with _timed(timings, "rpn"):
            prob, source = self._roi_probability(p, state, embeds)
            cell_box, box = rpn.map_to_box(prob, p.options.roi_threshold, p.original.size,
                                           relative=source == "attention", factor=factor)
        if box is None or box[2] - box[0] < factor or box[3] - box[1] < factor:
            log.debug("zoom wanted but no usable RoI (empty map or image under one merged token): direct answer")
            return _Direct(score, direct_hidden)
        return ZoomPlan(box=box, cell_box=cell_box, gate_score=score, roi_map=prob.tolist(), roi_source=source)

    def _roi_probability(self, p: Prepared, state: CoarseState, image_embeds) -> tuple[torch.Tensor, str]:
        if self.branches.has_rpn:
            return torch.sigmoid(rpn.roi_logits(self.branches, state, p.merged_hw).float()), "sd_rpn"
        generic = Prepared(
            original=p.original,
            input_ids=self.processor.prompt_ids(attention_roi.GENERIC_PROMPT, state.num_visual),
            pixel_values=p.pixel_values, grid_thw=p.grid_thw, options=p.options,
            patch_size=p.patch_size, merge_size=p.merge_size,
        )
        generic_state = prefill_to_k(self.model, generic, image_embeds, state.branch_layer)
        return attention_roi.attention_map(self.model, state, generic_state, p.merged_hw), "attention"

    def _direct(self, p: Prepared, state: CoarseState, decision: "_Direct", timings, cache_hit: bool) -> Result:
        hidden = decision.hidden
        if hidden is None:
            with _timed(timings, "prefill_rest"):
                hidden = decode.finish_prefill(self.model, state)
        with _timed(timings, "decode"):
            ids = decode.greedy_decode(
                self.model, hidden, state.cache, state.positions[:, :, -1:], p.input_ids,
                p.options.max_new_tokens, p.options.repetition_penalty,
            )
        return self._result(p, state, "direct", decision.gate_score, None, timings, ids, 0, cache_hit)

    def _zoom_result(self, p: Prepared, state: CoarseState, plan: ZoomPlan, timings, cache_hit) -> Result | None:
        """The zoom route, or None when the crop cannot be encoded (caller answers directly)."""
        with _timed(timings, "zoom_encode"):
            encoded = zoom.encode_crop(
                self.processor, p.original, plan.box, p.options.zoom_min_pixels, p.options.zoom_max_pixels
            )
            if encoded is None:
                return None
            pixel_values, roi_grid = encoded
            (roi_embeds,) = encode_images(self.model, pixel_values, roi_grid)
        roi_hw = (int(roi_grid[0, 1]) // p.merge_size, int(roi_grid[0, 2]) // p.merge_size)
        with _timed(timings, "zoom_prefill"):
            zin = zoom.build_zoom_input(state, roi_embeds, p.merged_hw, roi_hw, plan.cell_box,
                                        self.config.reuse_src_pos)
            hidden, cache = zoom.prefill_zoom(self.model, state, zin)
        with _timed(timings, "decode"):
            ids = decode.greedy_decode(
                self.model, hidden, cache, zin.positions[:, :, -1:], p.input_ids,
                p.options.max_new_tokens, p.options.repetition_penalty,
            )
        return self._result(p, state, "zoom", plan.gate_score, plan, timings, ids, zin.num_roi, cache_hit)

    def _result(self, p, state, route, gate_score, plan: ZoomPlan | None, timings, generated, num_roi,
                cache_hit) -> Result:
        timings["total"] = sum(v for k, v in timings.items() if k != "total" and not k.startswith("coarse."))
        return Result(
            answer=self.processor.tokenizer.decode(generated, skip_special_tokens=True).strip(),
            route=route,
            gate_score=gate_score,
            roi_map=plan.roi_map if plan else None,
            roi_box=tuple(plan.box) if plan else None,
            visual_tokens={"coarse": state.num_visual, "zoom": num_roi},
            generated_ids=generated,
            timings_ms=timings,
            original_size=p.original.size,
            input_size=p.input_size,
            roi_source=plan.roi_source if plan else None,
            cache_hit=cache_hit,
        )


@dataclass
class _Direct:
    gate_score: float | None
    hidden: torch.Tensor | None = None

"""The Q-Zoom engine: wires the stages, nothing else.

    preprocess -> coarse (vision + layers 0..K-1) -> gate -> rpn (map -> box) -> zoom (crop, re-encode,
    fused prefill reusing the prefix cache) or the plain prefill -> greedy decode

Three entry points:
- `answer(requests)`: the whole pipeline in-process (CLI, tests, a single-deployment server).
- `route(requests)`: the cheap half for a coarse+gate server. Direct answers are decoded here; requests
  that need the zoom come back as a `ZoomPlan` (box, gate score, map) for a zoom server.
- `zoom_batch([(request, plan), ...])` (`zoom(request, plan)`: a batch of one): the zoom half. It rebuilds
  the coarse prefix from the coarse vision features the plan carries (or, for an explicit box, the cached or freshly encoded ones) rather than receiving the
  layer 0..K-1 K/V over the network, then runs the fused prefill. A zoom server receives the prepared
  request (`for_zoom`: no coarse pixels) and the plan, so the image is decoded and encoded once.

Batches: requests are validated first (a bad one raises before any model work); then every stage runs
once for the rows that need it: the coarse vision tower (images that miss the feature cache), pass 1
(trunk layers 0..K-1), the gate (auto rows), the RPN (rows whose gate opened), the crops' vision tower,
the fused prefill (zooming rows) and the plain prefill's rest (direct rows), each one padded batch
(padding lives in `coarse.py`). Each row equals a single call up to floating-point summation order; a
batched stage's time is shared equally by its rows. Decoding runs every row of the batch together
(`decode.decode_batch`; a finished row leaves). The training-free RoI (plain weights) batches its
generic-prompt prefill; its map is read per row.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from . import attention_roi, decode, gate, rpn, zoom
from .cache import CoarseFeatures, FeatureKey
from .coarse import encode_images, prefill_batch_to_k, prefill_rest
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


@contextmanager
def _shared(timings: list[dict], name: str):
    """Time one batched stage; each row it served gets an equal share."""
    start = time.perf_counter()
    yield
    share = (time.perf_counter() - start) * 1000.0 / max(1, len(timings))
    for t in timings:
        t[name] = t.get(name, 0.0) + share


@dataclass
class _Prefill:
    """A row's finished prefill, ready to decode from."""

    hidden: torch.Tensor  # (1, D) last prompt token after the final norm
    cache: object  # DynamicCache of every layer over the row's prompt
    position: torch.Tensor  # (3, 1, 1) M-RoPE position of the last prompt token
    num_roi: int = 0  # M RoI tokens in the prompt; 0 for the plain prompt


@dataclass
class _Row:
    """One request on its way through a batch; each stage fills in its part."""

    prepared: Prepared
    embeds: torch.Tensor  # (Nv, D) coarse image features
    timings: dict[str, float]
    cache_hit: bool
    state: CoarseState | None = None
    gate_score: float | None = None
    plan: ZoomPlan | None = None  # set while the row is on the zoom route
    prefill: _Prefill | None = None


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
        rows = self._pass_one(requests)
        self._gate(rows)
        self._plan(rows)
        self._zoom_prefill([r for r in rows if r.plan is not None])
        return self._finish(rows)

    @torch.inference_mode()
    def route(self, requests: list[Request | Prepared]) -> list[Result | ZoomPlan]:
        rows = self._pass_one(requests)
        self._gate(rows)
        self._plan(rows)
        direct = iter(self._finish([r for r in rows if r.plan is None]))
        return [self._handoff(r) if r.plan is not None else next(direct) for r in rows]

    @torch.inference_mode()
    def zoom(self, request: Request | Prepared, plan: ZoomPlan) -> Result:
        """Zoom pass for one plan from `route` (or an explicit box): `zoom_batch` of one."""
        return self.zoom_batch([(request, plan)])[0]

    @torch.inference_mode()
    def zoom_batch(self, items: list[tuple[Request | Prepared, ZoomPlan]]) -> list[Result]:
        """Zoom pass for (request, plan) pairs; rebuilds each coarse prefix first, pass 1 as one padded batch.

        With a plan's coarse features no vision tower runs for it, and `cache_hit` is the coarse pass's (the
        only lookup made); the plans without them share one lookup-or-encode and report that.
        """
        own = [i for i, (_, plan) in enumerate(items) if plan.coarse is None]
        coarse = dict(zip(own, self._coarse_batch([items[i][0] for i in own]))) if own else {}
        rows = []
        for i, (request, plan) in enumerate(items):
            p, embeds, timings, hit = coarse[i] if i in coarse else self._travelled(request, plan)
            for name, ms in plan.timings_ms:
                timings[f"coarse.{name}"] = ms
            rows.append(_Row(p, embeds, timings, hit, gate_score=plan.gate_score, plan=plan))
        self._prefill_to_k(rows)
        self._zoom_prefill(rows)
        return self._finish(rows)

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
            with _shared([timings[i] for i in missing], "vision_coarse"):
                encoded = encode_images(
                    self.model,
                    torch.cat([prepared[i].pixel_values for i in missing]),
                    torch.cat([prepared[i].grid_thw for i in missing]),
                )
            for i, e in zip(missing, encoded):
                embeds[i] = e
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

    def _pass_one(self, requests) -> list[_Row]:
        """`_coarse_batch` plus pass 1 for the whole batch."""
        rows = [_Row(p, embeds, timings, hit) for p, embeds, timings, hit in self._coarse_batch(requests)]
        self._prefill_to_k(rows)
        return rows

    def _prefill_to_k(self, rows: list[_Row]) -> None:
        """Pass 1 (trunk layers 0..K-1) for the rows in one left-padded forward."""
        with _shared([r.timings for r in rows], "prefill_k"):
            states = prefill_batch_to_k(self.model, [r.prepared for r in rows], [r.embeds for r in rows],
                                        self.loaded.branch_layer)
        for row, state in zip(rows, states):
            row.state = state

    def _gate(self, rows: list[_Row]) -> None:
        """Gate scores of the auto rows in one call."""
        auto = [r for r in rows if r.prepared.options.mode == "auto"]
        if not auto:
            return
        with _shared([r.timings for r in auto], "gate"):
            if self.branches.has_gate:
                scores = gate.trained_gate_scores(self.branches, [r.state for r in auto])
            else:  # the confidence rule needs the direct prefill, which the direct route then reuses
                self._plain_prefill(auto)
                scores = [gate.confidence_gate_score(self.model.lm_head(r.prefill.hidden)) for r in auto]
        for row, score in zip(auto, scores):
            row.gate_score = score

    def _plan(self, rows: list[_Row]) -> None:
        """The RPN for the rows that want the zoom, in one call; a usable box puts a row on the zoom route."""
        wanted = [r for r in rows if r.prepared.options.mode == "zoom"
                  or (r.prepared.options.mode == "auto" and r.gate_score >= r.prepared.options.gate_threshold)]
        if not wanted:
            return
        with _shared([r.timings for r in wanted], "rpn"):
            for row, (prob, source) in zip(wanted, self._roi_probabilities(wanted)):
                row.plan = self._plan_from_map(row, prob, source)

    def _roi_probabilities(self, rows: list[_Row]) -> list[tuple[torch.Tensor, str]]:
        """-> per row (RoI map (Hm, Wm), its source)."""
        if self.branches.has_rpn:
            logits = rpn.roi_logits_batch(self.branches, [r.state for r in rows], [r.prepared.merged_hw for r in rows])
            return [(torch.sigmoid(x.float()), "sd_rpn") for x in logits]
        generic = [Prepared(
            original=r.prepared.original,
            input_ids=self.processor.prompt_ids(attention_roi.GENERIC_PROMPT, r.state.num_visual),
            pixel_values=r.prepared.pixel_values, grid_thw=r.prepared.grid_thw, options=r.prepared.options,
            patch_size=r.prepared.patch_size, merge_size=r.prepared.merge_size,
        ) for r in rows]
        generic_states = prefill_batch_to_k(self.model, generic, [r.embeds for r in rows], self.loaded.branch_layer)
        return [(attention_roi.attention_map(self.model, r.state, g, r.prepared.merged_hw), "attention")
                for r, g in zip(rows, generic_states)]

    def _plan_from_map(self, row: _Row, prob: torch.Tensor, source: str) -> ZoomPlan | None:
        p, factor = row.prepared, self.loaded.factor
        cell_box, box = rpn.map_to_box(prob, p.options.roi_threshold, p.original.size,
                                       relative=source == "attention", factor=factor)
        if box is None or box[2] - box[0] < factor or box[3] - box[1] < factor:
            log.debug("zoom wanted but no usable RoI (empty map or image under one merged token): direct answer")
            return None
        return ZoomPlan(box=box, cell_box=cell_box, gate_score=row.gate_score, roi_map=prob.tolist(),
                        roi_source=source)

    def _zoom_prefill(self, rows: list[_Row]) -> None:
        """Every zooming row's crop through the vision tower in one call, then the fused prefill as one padded
        batch. A crop under one merged token takes its row off the zoom route (answered directly)."""
        crops = []
        for row in rows:
            options = row.prepared.options
            with _timed(row.timings, "zoom_encode"):
                crops.append(zoom.encode_crop(self.processor, row.prepared.original, row.plan.box,
                                              options.zoom_min_pixels, options.zoom_max_pixels))
            if crops[-1] is None:
                row.plan = None
        rows, crops = [r for r in rows if r.plan is not None], [c for c in crops if c is not None]
        if not rows:
            return
        with _shared([r.timings for r in rows], "zoom_encode"):
            roi_embeds = encode_images(self.model, torch.cat([pv for pv, _ in crops]),
                                       torch.cat([grid for _, grid in crops]))
        with _shared([r.timings for r in rows], "zoom_prefill"):
            zins = []
            for row, roi, (_, grid) in zip(rows, roi_embeds, crops):
                merge = row.prepared.merge_size
                roi_hw = (int(grid[0, 1]) // merge, int(grid[0, 2]) // merge)
                zins.append(zoom.build_zoom_input(row.state, roi, row.prepared.merged_hw, roi_hw, row.plan.cell_box,
                                                  self.config.reuse_src_pos))
            prefills = zoom.prefill_zoom_batch(self.model, [r.state for r in rows], zins)
        for row, zin, (hidden, cache) in zip(rows, zins, prefills):
            row.prefill = _Prefill(hidden, cache, zin.positions[:, :, -1:], zin.num_roi)

    def _plain_prefill(self, rows: list[_Row]) -> None:
        """Trunk layers K..N-1 over each row's own prompt, one padded batch (no timing: callers time it)."""
        states = [r.state for r in rows]
        prefills = prefill_rest(self.model, states, [s.embeds for s in states], [s.positions for s in states],
                                [s.h_k.shape[1] for s in states])
        for row, (hidden, cache) in zip(rows, prefills):
            row.prefill = _Prefill(hidden, cache, row.state.positions[:, :, -1:])

    def _finish(self, rows: list[_Row]) -> list[Result]:
        """The direct rows' prefill rest in one batch (unless the gate already ran it), then decoding."""
        direct = [r for r in rows if r.prefill is None]
        if direct:
            with _shared([r.timings for r in direct], "prefill_rest"):
                self._plain_prefill(direct)
        return [self._result(r, ids) for r, ids in zip(rows, self._decode(rows))]

    def _decode(self, rows: list[_Row]) -> list[list[int]]:
        """Greedy tokens of every row from its prefill, all rows in one batched decode (a row that finishes
        leaves the batch); the one place decoding runs."""
        items = [decode.decode_item(self.model, r.prefill.hidden, r.prefill.cache, r.prefill.position,
                                    r.prepared.input_ids, r.prepared.options.max_new_tokens,
                                    r.prepared.options.repetition_penalty) for r in rows]
        with _shared([r.timings for r in rows], "decode"):
            return decode.decode_batch(self.model, items)

    def _handoff(self, row: _Row) -> ZoomPlan:
        """A row's plan as `route` returns it: with its timings and coarse features, for the zoom pass."""
        coarse = CoarseFeatures(embeds=row.embeds.detach().cpu(), grid_thw=row.prepared.grid_thw)
        return replace(row.plan, timings_ms=tuple(row.timings.items()), cache_hit=row.cache_hit, coarse=coarse)

    def _result(self, row: _Row, generated: list[int]) -> Result:
        p, plan, timings = row.prepared, row.plan, row.timings
        timings["total"] = sum(v for k, v in timings.items() if k != "total" and not k.startswith("coarse."))
        return Result(
            answer=self.processor.tokenizer.decode(generated, skip_special_tokens=True).strip(),
            route="zoom" if plan else "direct",
            gate_score=row.gate_score,
            roi_map=plan.roi_map if plan else None,
            roi_box=tuple(plan.box) if plan else None,
            visual_tokens={"coarse": row.state.num_visual, "zoom": row.prefill.num_roi},
            generated_ids=generated,
            timings_ms=timings,
            original_size=p.original.size,
            input_size=p.input_size,
            roi_source=plan.roi_source if plan else None,
            cache_hit=row.cache_hit,
        )

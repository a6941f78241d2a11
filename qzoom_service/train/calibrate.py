"""Measurements and threshold choices after training, shared by `qzoom train` and the embedded model's recipe.

- `teacher_hit_rate`: does the stage-1 self-distillation teacher localise? The share of pseudo labels whose
  attention peak, and whose tri-state foreground, falls on the target's grid cells (the recipe trains the
  SD-RPN on them only if it does; `qzoom train rpn-labels` reports it when the data has boxes).
- `calibrate_roi_threshold` (= `collect_roi_maps` + `roi_threshold_table` + `choose_roi_threshold`): the
  RoI threshold of a trained SD-RPN from held-out questions with known boxes (OUR step; the engine's
  default is 0.1); `roi_table_text` prints its table. `qzoom train calibrate-roi`.
- `choose_gate_threshold`: the gate threshold from `train_heads.gate_calibration`'s held-out table;
  `gate_table_text` prints that table. `qzoom train gate`.
- `write_serving_thresholds`: either threshold as a checkpoint's serving default in its config.json.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image
from tqdm import tqdm

from ..config import RequestOptions
from ..errors import InvalidInput
from ..released import CONFIG_KEYS
from ..rpn import map_to_box, original_to_cell_box
from ..synthetic import box_contains
from ..types import Request
from .data import Record, open_image
from .inputs import padded_frame
from .rpn_labels import IGNORE, PseudoLabelSet, tri_state_labels

__all__ = ["ROI_THRESHOLDS", "BoxedQuestion", "RoiMap", "teacher_hit_rate", "target_boxes", "boxed_questions",
           "collect_roi_maps", "roi_threshold_table", "choose_roi_threshold", "calibrate_roi_threshold",
           "roi_table_text", "choose_gate_threshold", "gate_table_text", "write_serving_thresholds"]

Box = tuple[int, int, int, int]

ROI_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
# The config.json key of each serving default (`released.CONFIG_KEYS` maps keys to our field names).
_THRESHOLD_KEYS = {field: key for key, field in CONFIG_KEYS.items() if field in ("roi_threshold", "gate_threshold")}


def _target_cells(box, grid_hw: tuple[int, int], original_size: tuple[int, int], square_padded: bool) -> torch.Tensor:
    """Bool (gh, gw): the grid cells `box` (original pixels) touches, on the padded square if the grid is one."""
    if square_padded:
        side, ox, oy = padded_frame(original_size)
        box, original_size = (box[0] + ox, box[1] + oy, box[2] + ox, box[3] + oy), (side, side)
    x0, y0, x1, y1 = original_to_cell_box(box, grid_hw, original_size)
    cells = torch.zeros(grid_hw, dtype=torch.bool)
    cells[y0:y1, x0:x1] = True
    return cells


def teacher_hit_rate(pseudo: PseudoLabelSet, boxes: dict[str, Box], **rules) -> dict:
    """How well the stage-1 teacher localises, on the samples of `pseudo` whose uid has a box in `boxes`
    (original pixels; others are not counted). `rules`: `tri_state_labels` keywords (default: its values).

    Returns `samples` (counted), `peak_hit_rate` (the raw grounding map's argmax on a target cell),
    `usable` (labels not all ignored), `fg_hit_rate` (of the usable, some foreground cell on the target)
    and `chance` (the peak hit rate of a uniformly random cell: the target's share of the grid, averaged).
    """
    padded = bool(pseudo.settings.get("square_pad", True))
    measured = [s for s in pseudo.samples if s.uid in boxes]
    peak_hits = fg_hits = usable = 0
    chance = 0.0
    for s in measured:
        target = _target_cells(boxes[s.uid], tuple(s.grounding.shape), tuple(s.original_size), padded)
        chance += float(target.float().mean())
        peak_hits += bool(target.flatten()[int(s.grounding.flatten().argmax())])
        labels = tri_state_labels(s.grounding, s.sink, s.original_size, square_padded=padded, **rules)
        if bool((labels != IGNORE).any()):
            usable += 1
            fg_hits += bool((target & (labels == 1)).any())
    n = max(1, len(measured))
    return {"samples": len(measured), "peak_hit_rate": peak_hits / n, "usable": usable,
            "fg_hit_rate": fg_hits / max(1, usable), "chance": chance / n}


@dataclass(frozen=True)
class BoxedQuestion:
    """A held-out question whose answer lies in `target_box` (original pixels, end exclusive)."""

    image: Image.Image
    question: str
    target_box: Box


@dataclass(frozen=True)
class RoiMap:
    """The SD-RPN's map for one held-out question, beside the box its answer lies in."""

    prob: torch.Tensor | None  # (Hm, Wm) probabilities; None: no usable RoI even at the lowest threshold
    image_size: tuple[int, int]  # (width, height) of the original image
    target_box: Box
    factor: int  # the model's pixels per merged-token side


def _one_box(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)


def target_boxes(records: list[Record]) -> dict[str, Box]:
    """uid -> `target_box` of the records that carry one box (rows with a list of boxes are left out)."""
    return {r.uid: tuple(r.extra["target_box"]) for r in records if _one_box(r.extra.get("target_box"))}


def boxed_questions(records: list[Record]) -> Iterator[BoxedQuestion]:
    """The records as `BoxedQuestion`s; every `target_box` is checked before the first image is opened,
    and images open one at a time as the caller iterates."""
    for r in records:
        if not _one_box(r.extra.get("target_box")):
            raise InvalidInput(f"{r.where()}: 'target_box' must be [x1, y1, x2, y2] in pixels; "
                               f"got {r.extra.get('target_box')!r}")
    return (BoxedQuestion(open_image(r.image, r.where()), r.question, tuple(r.extra["target_box"])) for r in records)


def collect_roi_maps(engine, questions: Iterable, *, lowest_threshold: float, min_pixels: int | None = None,
                     max_pixels: int | None = None, progress: bool = False) -> list[RoiMap]:
    """Route each question (anything with `image`, `question`, `target_box`: a `BoxedQuestion`, a synthetic
    `Sample`) with the zoom forced and the RoI threshold at `lowest_threshold`, so a map comes back wherever
    any threshold tried afterwards could give a box. Pixel budgets: None = the engine's coarse budget."""
    if not engine.branches.has_rpn:
        raise InvalidInput("the model has no trained SD-RPN (twig branch): train stage 1 before calibrating it")
    options = RequestOptions(mode="zoom", min_pixels=min_pixels, max_pixels=max_pixels,
                             roi_threshold=lowest_threshold)
    maps = []
    for q in tqdm(questions, desc="calibrate-roi", disable=not progress):
        plan = engine.route([Request(q.image, q.question, options)])[0]
        prob = torch.tensor(plan.roi_map) if plan.roi_map is not None else None
        maps.append(RoiMap(prob, tuple(q.image.size), tuple(q.target_box), engine.loaded.factor))
    return maps


def roi_threshold_table(maps: list[RoiMap], thresholds=ROI_THRESHOLDS) -> list[dict]:
    """One row per threshold: `hit_rate` (share of all `maps` whose box contains the target; a missing map
    is a miss) and `mean_box_side` (pixels, root of the mean box area; None without any box)."""
    rows = []
    for t in thresholds:
        hits, areas = 0, []
        for m in maps:
            box = map_to_box(m.prob, t, m.image_size, factor=m.factor)[1] if m.prob is not None else None
            if box is not None:
                hits += box_contains(box, m.target_box)
                areas.append((box[2] - box[0]) * (box[3] - box[1]))
        rows.append({"threshold": t, "hit_rate": hits / max(1, len(maps)),
                     "mean_box_side": (sum(areas) / len(areas)) ** 0.5 if areas else None})
    return rows


def choose_roi_threshold(table: list[dict], tolerance: float = 0.02) -> float:
    """The highest threshold (the tightest boxes) whose hit rate is within `tolerance` of the best."""
    if not table:
        raise InvalidInput("the RoI calibration table is empty")
    best = max(r["hit_rate"] for r in table)
    return max(r["threshold"] for r in table if r["hit_rate"] >= best - tolerance)


def calibrate_roi_threshold(engine, questions: Iterable, *, thresholds=ROI_THRESHOLDS, tolerance: float = 0.02,
                            min_pixels: int | None = None, max_pixels: int | None = None,
                            progress: bool = False) -> tuple[float, list[dict]]:
    """(chosen RoI threshold, table) for `engine`'s SD-RPN on held-out `questions` (see `collect_roi_maps`)."""
    thresholds = tuple(thresholds)
    if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
        raise InvalidInput(f"RoI thresholds must be probabilities in (0, 1]; got {list(thresholds)}")
    if tolerance < 0:
        raise InvalidInput(f"tolerance must be >= 0; got {tolerance}")
    maps = collect_roi_maps(engine, questions, lowest_threshold=min(thresholds), min_pixels=min_pixels,
                            max_pixels=max_pixels, progress=progress)
    if not maps:
        raise InvalidInput("no held-out questions to calibrate the RoI threshold on")
    table = roi_threshold_table(maps, thresholds)
    return choose_roi_threshold(table, tolerance), table


def choose_gate_threshold(table: list[dict]) -> float:
    """The threshold of `gate_calibration`'s table with the best held-out accuracy; on ties the middle of the
    tied ones (a small held-out set ties over a wide range, and its lowest end opens the gate for almost
    everything)."""
    rows = [r for r in table if r["accuracy"] is not None]
    if not rows:
        raise InvalidInput("the gate calibration table has no accuracy (no held-out items)")
    best = max(r["accuracy"] for r in rows)
    tied = sorted(r["threshold"] for r in rows if r["accuracy"] == best)
    return tied[(len(tied) - 1) // 2]


def roi_table_text(table: list[dict]) -> str:
    """The table of `roi_threshold_table`, one threshold per line."""
    lines = ["threshold  hit_rate  mean_box_side_px"]
    for row in table:
        side = "-" if row["mean_box_side"] is None else f"{row['mean_box_side']:.0f}"
        lines.append(f"{row['threshold']:9.2f}  {row['hit_rate']:8.2f}  {side:>16}")
    return "\n".join(lines)


def gate_table_text(table: list[dict]) -> str:
    """The precision/recall table of `gate_calibration`, one threshold per line."""
    fmt = lambda v: "  -  " if v is None else f"{v:5.2f}"  # noqa: E731
    lines = ["threshold  precision  recall  zoom_rate  accuracy"]
    lines += [f"{row['threshold']:9.2f}  {fmt(row['precision']):>9}  {fmt(row['recall']):>6}  "
              f"{fmt(row['zoom_rate']):>9}  {fmt(row['accuracy']):>8}" for row in table]
    return "\n".join(lines)


def write_serving_thresholds(model_dir: str | Path, *, roi_threshold: float | None = None,
                             gate_threshold: float | None = None) -> Path:
    """Set the given thresholds (probabilities) as the checkpoint's serving defaults in its config.json,
    replaced atomically. Returns the config path."""
    given = {k: v for k, v in (("roi_threshold", roi_threshold), ("gate_threshold", gate_threshold)) if v is not None}
    bad = [f"{k}={v!r}" for k, v in given.items() if not 0.0 <= v <= 1.0]
    if bad:
        raise InvalidInput(f"thresholds are probabilities in [0, 1]; got {', '.join(bad)}")
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{model_dir}: not a local checkpoint directory with a config.json ({e})") from None
    cfg.update({_THRESHOLD_KEYS[k]: float(v) for k, v in given.items()})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, path)
    return path

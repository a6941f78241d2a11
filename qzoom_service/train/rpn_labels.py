"""Stage 1 labels for the SD-RPN: self-distilled pseudo labels or ground-truth boxes.

"The reference" is the public reference implementation, github.com/YuHengsss/Q-Zoom (its raw maps come
from `make_stage1_pseudo_labels.py`).

Pseudo labels, as in Q-Zoom, are stored RAW (the grounding map G and the sink map S per sample) and
turned into tri-state cell labels (FG 1 / BG 0 / ignore -100) when the training set is built, so the
thresholds stay tunable (as the reference's `ROITrainingDataset`). Storage: one safetensors + one JSON file.

`labels_from_boxes` is a different, explicitly separate mode: labels from annotated boxes, for models
whose own attention does not localise (e.g. a tiny random model). It is not part of the paper.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from qzoom_client.coords import input_size_for
from tqdm import tqdm

from ..coarse import encode_images
from ..errors import InvalidInput
from ..rpn import blur3, cells_to_box
from .checkpoint import atomic_dir
from .data import Record, image_size, meaningful_token_ids, open_image
from .inputs import encode_at_budget, padded_frame, square_pad
from .teacher import answer_attention, greedy_answer_ids

__all__ = ["HeadSet", "KNOWN_HEADS", "default_heads", "parse_heads", "teacher_prompt", "PseudoLabel",
           "PseudoLabelSet", "make_pseudo_labels", "save_pseudo_labels", "load_pseudo_labels", "padding_cells",
           "tri_state_labels", "labels_from_boxes", "RPNSample", "rpn_samples_from_pseudo",
           "rpn_samples_from_boxes", "IGNORE"]

IGNORE = -100
FORMAT = "qzoom-rpn-pseudo-labels/1"
SHORT_ANSWER = "Answer the question using a single word or phrase."
# Our wording of the reference's natural-mode grounding instruction (its `build_prompt`), not a copy of it.
GROUNDING_INSTRUCTION = ("Locate the objects the question is about. Output one box per line as raw text "
                         "`x_min y_min x_max y_max label`, no JSON.")


@dataclass(frozen=True)
class HeadSet:
    """(layer -> heads) used to aggregate attention; 0-based decoder layers (reference `get_head_config`)."""

    grounding: dict
    sink: dict = field(default_factory=dict)

    def layers(self) -> set[int]:
        return set(self.grounding) | set(self.sink)


# The reference's `get_head_config` tables, keyed by (decoder layers, attention heads): Qwen2.5-VL-3B, -7B.
KNOWN_HEADS = {
    (36, 16): {"textual": HeadSet({20: (1, 4), 22: (14,)}),
               "natural": HeadSet({21: (9, 11), 22: (0, 7)}, {8: (1, 13)})},
    (28, 28): {"textual": HeadSet({22: (1, 4), 23: (6, 11)}),
               "natural": HeadSet({16: (1, 7, 17), 19: (17, 20)}, {9: (4, 22)})},
}


def default_heads(num_layers: int, num_heads: int, mode: str = "textual") -> HeadSet:
    """The Q-Zoom head table for Qwen2.5-VL-3B/7B; otherwise OUR heuristic (not the paper's):
    every head of layers round(0.6 L) .. round(0.8 L) inclusive (half rounded up), no sink heads.
    How the paper picked its heads is UNKNOWN."""
    if mode not in ("textual", "natural"):
        raise InvalidInput(f"mode must be 'textual' or 'natural'; got {mode!r}")
    known = KNOWN_HEADS.get((num_layers, num_heads))
    if known is not None:
        return known[mode]
    lo = min(num_layers - 1, int(0.6 * num_layers + 0.5))
    hi = min(num_layers - 1, int(0.8 * num_layers + 0.5))
    return HeadSet({layer: tuple(range(num_heads)) for layer in range(lo, hi + 1)})


def parse_heads(text: str, num_layers: int, num_heads: int) -> dict:
    """'20:1,4;22:14' -> {20: (1, 4), 22: (14,)}; '' -> {}. Out-of-range indices raise `InvalidInput`."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            layer, heads = part.split(":")
            layer, heads = int(layer), tuple(int(h) for h in heads.split(","))
        except ValueError:
            raise InvalidInput(f"bad head spec {part!r}: expected 'layer:head,head' (e.g. '20:1,4;22:14')") from None
        if not 0 <= layer < num_layers or not all(0 <= h < num_heads for h in heads):
            raise InvalidInput(f"head spec {part!r} is outside {num_layers} layers x {num_heads} heads")
        out[layer] = heads
    return out


def teacher_prompt(question: str, mode: str, short_prompt: bool = True) -> str:
    """The prompt the teacher answers (reference `build_prompt`): natural -> the short-answer suffix is replaced
    by (or the question followed by) a grounding instruction; textual -> the question, minus the
    short-answer suffix when `short_prompt` is False."""
    if mode == "natural":
        base = question.replace(SHORT_ANSWER, "").rstrip()
        return f"{base}\n{GROUNDING_INSTRUCTION}"
    if mode == "textual":
        return question if short_prompt else question.replace(SHORT_ANSWER, "").rstrip()
    raise InvalidInput(f"mode must be 'textual' or 'natural'; got {mode!r}")


@dataclass
class PseudoLabel:
    """Raw stage-1 maps of one sample: grounding G and sink S, both (gh, gw) float32."""

    uid: str
    row: int
    image: Path
    question: str  # raw question, as the student is trained on it
    answer: str  # the teacher's generated text
    mode: str
    original_size: tuple[int, int]  # (width, height) of the unpadded image
    grounding: torch.Tensor
    sink: torch.Tensor


@dataclass
class PseudoLabelSet:
    settings: dict
    samples: list[PseudoLabel]
    dropped: dict = field(default_factory=dict)  # reason -> count


def _aggregate(attn: dict, heads: dict, like: torch.Tensor) -> torch.Tensor:
    """Equal-weight mean over the listed (layer, head) pairs (the reference's `aggregate_attention`)."""
    pairs = [attn[layer][h] for layer, hs in sorted(heads.items()) for h in hs]
    return torch.stack(pairs).mean(0) if pairs else torch.zeros_like(like)


def make_pseudo_labels(loaded, records: list[Record], *, heads: HeadSet | None = None, mode: str = "textual",
                       short_prompt: bool = True, token_budget: int = 576, pad_square: bool = True,
                       max_new_tokens: int = 128, answer_source: str = "generate",
                       progress: bool = False) -> PseudoLabelSet:
    """Teacher run over `records` (see `teacher.py`). A record's own `mode` key wins over `mode`;
    without explicit `heads`, each mode gets `default_heads` for that mode (the tables differ per mode).

    answer_source: 'generate' (the teacher's greedy answer, as Q-Zoom) or 'dataset' (teacher-force the
    record's answer, SD-RPN's 'lazy' variant). Samples whose answer has fewer than 2 tokens are dropped
    (no row is ever fed back) and counted in `dropped`.
    """
    if answer_source not in ("generate", "dataset"):
        raise InvalidInput(f"answer_source must be 'generate' or 'dataset'; got {answer_source!r}")
    model, processor = loaded.model, loaded.processor
    text = model.config.text_config
    eos = processor.token_id("<|im_end|>")
    samples, dropped, used = [], {}, {}
    for record in tqdm(records, desc="rpn-labels", disable=not progress):
        image = open_image(record.image, record.where())
        rec_mode = record.extra.get("mode", mode)
        if rec_mode not in used:
            used[rec_mode] = heads or default_heads(text.num_hidden_layers, text.num_attention_heads, rec_mode)
        rec_heads = used[rec_mode]
        fed = square_pad(image) if pad_square else image
        prepared = encode_at_budget(processor, fed, teacher_prompt(record.question, rec_mode, short_prompt),
                                    token_budget)
        (embeds,) = encode_images(model, prepared.pixel_values, prepared.grid_thw)
        if answer_source == "generate":
            answer_ids = greedy_answer_ids(model, prepared, embeds, max_new_tokens)
        else:
            answer_ids = meaningful_token_ids(processor.tokenizer, record.answer) + [eos]
        if len(answer_ids) < 2:
            dropped["short_answer"] = dropped.get("short_answer", 0) + 1
            continue
        attn = answer_attention(model, prepared, answer_ids, rec_heads.layers(), embeds)
        grid = prepared.merged_hw
        g = _aggregate(attn, rec_heads.grounding, next(iter(attn.values()))[0])
        s = _aggregate(attn, rec_heads.sink, g)
        samples.append(PseudoLabel(
            uid=record.uid, row=record.row, image=record.image, question=record.question,
            answer=processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip(), mode=rec_mode,
            original_size=image.size, grounding=g.view(grid).cpu().contiguous(), sink=s.view(grid).cpu().contiguous(),
        ))
    heads_used = {m: {"grounding": {str(k): list(v) for k, v in h.grounding.items()},
                      "sink": {str(k): list(v) for k, v in h.sink.items()}} for m, h in used.items()}
    settings = dict(heads=heads_used, token_budget=token_budget,
                    square_pad=pad_square, max_new_tokens=max_new_tokens, answer_source=answer_source,
                    short_prompt=short_prompt, model=loaded.model_id)
    return PseudoLabelSet(settings, samples, dropped)


def save_pseudo_labels(labels: PseudoLabelSet, out_dir: str | Path) -> Path:
    """Write `labels.safetensors` (grounding.i, sink.i) + `labels.json` atomically into `out_dir`.

    Image paths are stored relative to `out_dir` (the loader resolves them against it, as Q-Zoom does
    against the pickle's folder)."""
    out = Path(out_dir).resolve()
    tensors, rows = {}, []
    for i, s in enumerate(labels.samples):
        tensors[f"grounding.{i}"], tensors[f"sink.{i}"] = s.grounding.float(), s.sink.float()
        meta = {k: v for k, v in asdict(s).items() if k not in ("grounding", "sink")}
        meta["image"] = os.path.relpath(Path(s.image).resolve(), out)
        rows.append(meta)
    with atomic_dir(out, "labels.json") as tmp:
        save_file(tensors, tmp / "labels.safetensors", metadata={"format": FORMAT})
        doc = {"format": FORMAT, "settings": labels.settings, "dropped": labels.dropped, "samples": rows}
        (tmp / "labels.json").write_text(json.dumps(doc, indent=1))
    return out


def load_pseudo_labels(path: str | Path) -> PseudoLabelSet:
    root = Path(path)
    try:
        doc = json.loads((root / "labels.json").read_text())
        tensors = load_file(str(root / "labels.safetensors"))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{root}: not a pseudo-label directory ({e})") from None
    if doc.get("format") != FORMAT:
        raise InvalidInput(f"{root}: unknown pseudo-label format {doc.get('format')!r}; expected {FORMAT}")
    samples = [PseudoLabel(**{**m, "image": root / m["image"], "original_size": tuple(m["original_size"]),
                              "grounding": tensors[f"grounding.{i}"], "sink": tensors[f"sink.{i}"]})
               for i, m in enumerate(doc["samples"])]
    return PseudoLabelSet(doc["settings"], samples, doc.get("dropped", {}))


def padding_cells(grid: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
    """Bool (gh, gw): cells covering the grey square padding (the reference's `get_foreground_mask`):
    the longer side fills the grid, the shorter spans int(short / long * n) cells, centred."""
    gh, gw = grid
    w, h = original_size
    pad = torch.ones(gh, gw, dtype=torch.bool)
    rows = gh if h >= w else int(h / w * gh)
    cols = gw if w >= h else int(w / h * gw)
    r0, c0 = (gh - rows) // 2, (gw - cols) // 2
    pad[r0 : r0 + rows, c0 : c0 + cols] = False
    return pad


def tri_state_labels(grounding: torch.Tensor, sink: torch.Tensor | None, original_size, *, fg_ratio=0.25,
                     bg_ratio=0.05, sink_thresh=1e-2, max_box_frac=0.5, min_peak=5e-3, blur=3, pad_is_bg=True,
                     square_padded=True) -> torch.Tensor:
    """FG 1 / BG 0 / ignore -100 per cell from raw maps, exactly the reference's `create_pseudo_labels`
    with the Stage-1 script values as defaults. blur: 3 (Gaussian 3x3, sigma 1) or 0 (SD-RPN LLaVA)."""
    if blur not in (0, 3):
        raise InvalidInput(f"blur must be 3 (Gaussian 3x3) or 0 (none); got {blur}")
    g = grounding.float()
    sinks = (sink.float() >= sink_thresh) if sink is not None else torch.zeros_like(g, dtype=torch.bool)
    pad = padding_cells(tuple(g.shape), original_size) if (pad_is_bg and square_padded) else torch.zeros_like(sinks)
    g1 = g.masked_fill(sinks | pad, 0.0)
    peak = float(g1.max())
    fg = g1 > fg_ratio * peak
    spread = blur3(g1 * fg) if blur == 3 else g1 * fg  # dilates the FG extent by about one cell
    box = cells_to_box(spread > 0) or (0, 0, g.shape[1], g.shape[0])  # (x0, y0, x1, y1), end exclusive
    inside = torch.zeros_like(sinks)
    inside[box[1] : box[3], box[0] : box[2]] = True
    bg = (~inside & (g.masked_fill(sinks, 0.0) < bg_ratio * peak)) | pad
    labels = torch.full(g.shape, IGNORE, dtype=torch.long)
    area = (box[2] - box[0]) * (box[3] - box[1])
    if area < max_box_frac * g.numel() and peak >= min_peak:
        labels[bg] = 0
        labels[fg] = 1  # FG wins where both hold
    return labels


def labels_from_boxes(target_box, grid: tuple[int, int], original_size, *, pad_square: bool = True,
                      touched: str = "ignore") -> torch.Tensor:
    """Tri-state labels from annotated boxes (OUR mode, not the paper's self-distillation).

    target_box: one (x1, y1, x2, y2) in original pixels, end exclusive, or a list of them. FG: cells
    whose centre lies in a box, plus the cell holding each box centre (so tiny boxes get one cell);
    the other cells a box overlaps are ignored, or with `touched="foreground"` foreground too (for boxes
    smaller than a cell: the RoI then has to span every cell the target touches to contain it);
    BG: the rest (square padding included).
    """
    if touched not in ("ignore", "foreground"):
        raise InvalidInput(f"touched must be 'ignore' or 'foreground', got {touched!r}")
    boxes = [target_box] if isinstance(target_box[0], (int, float)) else list(target_box)
    gh, gw = grid
    w, h = original_size
    if pad_square:
        side, ox, oy = padded_frame(original_size)
        fw = fh = side
    else:
        (fw, fh), ox, oy = (w, h), 0, 0
    cw, ch = fw / gw, fh / gh
    cx = (torch.arange(gw) + 0.5) * cw  # cell centres in frame pixels
    cy = (torch.arange(gh) + 0.5) * ch
    fg = torch.zeros(gh, gw, dtype=torch.bool)
    cover = torch.zeros_like(fg)
    for x1, y1, x2, y2 in boxes:
        x1, x2, y1, y2 = x1 + ox, x2 + ox, y1 + oy, y2 + oy
        fg |= ((cy >= y1) & (cy < y2))[:, None] & ((cx >= x1) & (cx < x2))[None, :]
        r = min(gh - 1, int((y1 + y2) / 2 / ch))
        c = min(gw - 1, int((x1 + x2) / 2 / cw))
        fg[r, c] = True
        r0, r1 = int(y1 // ch), min(gh, int(-(-y2 // ch)))
        c0, c1 = int(x1 // cw), min(gw, int(-(-x2 // cw)))
        cover[r0:r1, c0:c1] = True
    labels = torch.zeros(gh, gw, dtype=torch.long)
    labels[cover] = 1 if touched == "foreground" else IGNORE
    labels[fg] = 1
    return labels


@dataclass(frozen=True)
class RPNSample:
    """One stage-1 training item: the image is fed at min = max = token_budget x 28 x 28 pixels."""

    uid: str
    image: Path
    question: str
    labels: torch.Tensor  # (gh, gw) long: 1 / 0 / -100
    original_size: tuple[int, int]
    token_budget: int
    pad_square: bool


def rpn_samples_from_pseudo(labels: PseudoLabelSet, **rules) -> tuple[list[RPNSample], int]:
    """Tri-state labels for every stored sample (`rules`: `tri_state_labels` keywords). Samples whose
    labels are all -100 (box too big, weak peak) would add nothing to the loss: they are dropped here
    and counted. Returns (samples, dropped)."""
    pad = bool(labels.settings.get("square_pad", True))
    out, dropped = [], 0
    for s in labels.samples:
        lab = tri_state_labels(s.grounding, s.sink, s.original_size, square_padded=pad, **rules)
        if bool((lab == IGNORE).all()):
            dropped += 1
            continue
        out.append(RPNSample(s.uid, Path(s.image), s.question, lab, tuple(s.original_size),
                             int(labels.settings["token_budget"]), pad))
    return out, dropped


def rpn_samples_from_boxes(records: list[Record], *, factor: int, token_budget: int = 576, pad_square: bool = True,
                           touched: str = "ignore") -> list[RPNSample]:
    """Ground-truth-box mode: each record needs `target_box` [x1, y1, x2, y2] (or a list of boxes);
    `touched` as in `labels_from_boxes`; `factor`: the model's pixels per merged-token side."""
    out = []
    for r in records:
        box = r.extra.get("target_box")
        if not isinstance(box, list) or not box:
            raise InvalidInput(f"{r.where()}: box labels need a 'target_box' [x1, y1, x2, y2] key")
        size = image_size(r.image, r.where())
        frame = (padded_frame(size)[0],) * 2 if pad_square else size
        pixels = token_budget * factor**2
        w, h = input_size_for(*frame, pixels, pixels, factor)
        out.append(RPNSample(r.uid, r.image, r.question, labels_from_boxes(box, (h // factor, w // factor), size,
                                                                          pad_square=pad_square, touched=touched),
                             size, token_budget, pad_square))
    return out

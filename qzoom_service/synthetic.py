"""Deterministic synthetic fine-grained visual QA benchmark, sized for a tiny Qwen2.5-VL on CPU.

Two splits, each scene drawn from an integer seed:

* ``hr`` (default 1344x1008): plain or mildly noisy light background, ONE big coloured shape and 1-3 tiny
  bordered boxes, each holding one small target.
* ``doc`` (default 896x1152): white page with a title bar, grey bars imitating text lines, one big coloured
  shape as a figure, and 1-2 tiny bordered boxes among the lines, each holding one small target.

Targets (``targets=``): ``"dots"`` (default) — ONE small dark-bordered box per scene holding a dot in one of
the six colours, asked as "What colour is the dot in the small box?"; ``"marks"`` — boxes with colour-coded
borders (1-3 in ``hr``, 1-2 in ``doc``, referred to as "the small red box") holding a dark circle, square or
triangle ("What shape is in ...?"); ``"glyphs"`` — the same with a seven-segment digit (``hr``) or digit/letter
(``doc``). The embedded model reads dots: a tiny model trained from scratch learns colours within a few hundred
steps but stayed at chance on shapes (even of the big object) and glyphs, and with a coloured border around a
coloured dot it answered the border's colour (see its model card).

Why these sizes: coarse questions ask about the single big shape (30-45 % of the short side), because a tiny
model learns colour/shape from the coarse view only when one large object dominates. Fine targets sit in a
box of side 1.8x ``glyph_height`` (24 +- ``glyph_jitter`` 2 px, so 40-47 px) with a border of a quarter of that
height; glyphs and marks are ``glyph_height`` tall, dots 0.4x (9-10 px). At the embedded model's coarse budget
(144 tokens: 392x280 px for ``hr``, 280x364 for ``doc``) the box is ~13 px with a ~2 px border (visible, so the
box can be found) and a dot ~3 px, a few percent of a 14 px patch next to the border's ink, so the coarse
view hardly shows the dot's colour (nor a 7 px mark's shape). The zoom crop over the one or two grid cells
around the box (~90-190 px) re-encoded at the same budget (~336 px) shows a dot 16-35 px wide, a mark 40-90
px. Fine answers therefore need the zoom.

Glyphs are axis-aligned segment rectangles (seven-segment digits and letters, plus a centre stroke for T) and
marks are filled polygons: no font file, no antialiasing on the box. Exact colours keep targets crisp under
upsampling and make every drawn box checkable pixel by pixel (the border of a target box covers exactly
``target_box``, end-exclusive).

Every sample derives from (seed, split, index) through SHA-256, never Python's salted ``hash()``, so sample i
does not depend on n or on the process. Scene and question use separate streams: ``fine_fraction`` changes
the question, never the pixels.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["ANSWER_VOCAB", "COLOURS", "SHAPES", "DIGITS", "LETTERS", "SPLITS", "Sample", "Scene", "Target",
           "TARGET_KINDS", "box_contains", "box_side", "boxes_overlap", "border_rgb", "chance_accuracy", "dot_size", "generate",
           "glyph_rects", "glyph_size",
           "iter_samples", "make_sample", "make_scene", "stable_seed", "write_dataset"]

Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]

SPLITS = ("hr", "doc")
COLOURS: dict[str, RGB] = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
                           "yellow": (235, 200, 20), "orange": (245, 130, 20), "purple": (140, 50, 180)}
SHAPES = ("circle", "square", "triangle")
DIGITS = tuple("0123456789")
LETTERS = tuple("ACEFHLPTU")  # only letters a segment display draws unambiguously

ANSWER_VOCAB: dict[str, list[str]] = {"colour": list(COLOURS), "shape": list(SHAPES),
                                      "digit": list(DIGITS), "letter": list(LETTERS)}
ANSWER_VOCAB["coarse"] = ANSWER_VOCAB["colour"] + ANSWER_VOCAB["shape"]
ANSWER_VOCAB["dot"] = list(COLOURS)  # fine questions of the default `targets="dots"`
ANSWER_VOCAB["mark"] = list(SHAPES)  # fine questions of `targets="marks"`
ANSWER_VOCAB["glyph"] = ANSWER_VOCAB["digit"] + ANSWER_VOCAB["letter"]  # fine questions of `targets="glyphs"`
ANSWER_VOCAB["fine"] = ANSWER_VOCAB["dot"]

# Dark inks: contrast with the white box interior and never equal a (saturated) border colour.
INKS: tuple[RGB, ...] = ((20, 20, 20), (20, 30, 120), (110, 20, 20), (20, 80, 30))
DOT_BOX_BORDER: RGB = (45, 45, 45)  # `border="dark"`: the box of a dot, uncoloured so only the dot has a colour
BOX_FILL: RGB = (255, 255, 255)
PAGE: RGB = (255, 255, 255)
HR_BACKGROUNDS: tuple[RGB, ...] = ((236, 236, 236), (242, 238, 228), (228, 236, 242), (234, 242, 230))
TEXT_GREYS: tuple[RGB, ...] = ((110, 110, 110), (135, 135, 135), (160, 160, 160))
TITLE_GREY: RGB = (60, 60, 60)

_DEFAULT_SIZES = {"hr": {"width": 1344, "height": 1008}, "doc": {"width": 896, "height": 1152}}
_DEFAULT_GLYPH = {"glyph_height": 24, "glyph_jitter": 2, "targets": "dots"}
TARGET_KINDS = ("dots", "marks", "glyphs")
_SPLIT_CODE = {"hr": 1, "doc": 2}
_SCENE_STREAM, _QUESTION_STREAM = 0, 1
_MAX_TRIES = 200  # per target; bounded so a cramped canvas fails fast instead of looping

# Segments: a top, b upper right, c lower right, d bottom, e lower left, f upper left, g middle, v centre.
_SEGMENTS = {"0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc", "5": "afgcd", "6": "afgedc",
             "7": "abc", "8": "abcdefg", "9": "abcdfg", "A": "abcefg", "C": "adef", "E": "adefg", "F": "aefg",
             "H": "bcefg", "L": "def", "P": "abefg", "T": "av", "U": "bcdef"}


@dataclass(frozen=True)
class Target:
    box: Box
    char: str  # glyph, shape name (a mark) or colour name (a dot)
    border: str  # colour name, used to refer to the box when a scene has several; "dark" for a dot's box
    ink: RGB  # the glyph's, mark's or dot's colour
    glyph_height: int


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    split: str
    shape: str
    colour: str
    shape_box: Box
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str  # "coarse" or "fine"
    target_box: Box
    split: str
    seed: int
    index: int
    answer_set: str = ""  # key of ANSWER_VOCAB for this exact question type: colour, shape, dot, mark, digit, letter

    def to_record(self, image_path) -> dict:
        return {"image": str(image_path), "question": self.question, "answer": self.answer, "kind": self.kind,
                "target_box": list(self.target_box), "split": self.split}


def chance_accuracy(kind: str) -> float:
    """Accuracy of a uniform guess over ANSWER_VOCAB[kind] (kind: coarse, fine, colour, shape, mark, digit, letter)."""
    return 1.0 / len(ANSWER_VOCAB[kind])


def box_contains(box: Box, target: Box) -> bool:
    return box[0] <= target[0] and box[1] <= target[1] and target[2] <= box[2] and target[3] <= box[3]


def boxes_overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def box_side(glyph_height: int) -> int:
    return round(glyph_height * 1.8)


def _pad(box: Box, p: int) -> Box:
    return box[0] - p, box[1] - p, box[2] + p, box[3] + p


def stable_seed(*parts) -> int:
    """A 64-bit seed from `parts` (ints or strings) through SHA-256: unlike `hash()`, the same in every process.
    Training (batch order, example draws, gate labels) seeds from it too; the held-out scenes and the shipped
    figures depend on its exact values."""
    return int.from_bytes(hashlib.sha256(",".join(map(str, parts)).encode()).digest()[:8], "big")


def _fill(draw: ImageDraw.ImageDraw, box: Box, colour: RGB) -> None:
    # PIL rectangles include their end point; our boxes are end-exclusive.
    draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)


# --- glyphs -----------------------------------------------------------------------------------------------

def glyph_size(height: int) -> tuple[int, int]:
    return max(5, round(height * 0.6)), height


def glyph_rects(char: str, x0: int, y0: int, height: int) -> list[Box]:
    """End-exclusive segment rectangles of `char` with its top-left corner at (x0, y0); every glyph spans the
    full `height`, so its drawn bbox height is exactly `height`."""
    w, h = glyph_size(height)
    t = max(2, round(height / 6))
    mid0 = (h - t) // 2
    mid1, c0 = mid0 + t, (w - t) // 2
    parts = {"a": (0, 0, w, t), "b": (w - t, 0, w, mid1), "c": (w - t, mid0, w, h), "d": (0, h - t, w, h),
             "e": (0, mid0, t, h), "f": (0, 0, t, mid1), "g": (0, mid0, w, mid1), "v": (c0, 0, c0 + t, h)}
    return [(x0 + a, y0 + b, x0 + c, y0 + d) for a, b, c, d in (parts[s] for s in _SEGMENTS[char])]


def dot_size(glyph_height: int) -> int:
    return max(3, round(glyph_height * 0.4))


def border_rgb(target: "Target") -> RGB:
    return DOT_BOX_BORDER if target.border == "dark" else COLOURS[target.border]


def _draw_target(draw: ImageDraw.ImageDraw, target: Target) -> None:
    x1, y1, x2, y2 = target.box
    # A border thick enough that its colour survives the coarse view: the box is found by it.
    border = max(2, round(target.glyph_height / 4))
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=BOX_FILL, outline=border_rgb(target), width=border)
    if target.char in COLOURS:  # a dot: a filled disc, centred
        side = dot_size(target.glyph_height)
        mx, my = x1 + (x2 - x1 - side) // 2, y1 + (y2 - y1 - side) // 2
        _draw_shape(draw, "circle", (mx, my, mx + side, my + side), target.ink)
        return
    if target.char in SHAPES:  # a mark: the shape in ink, glyph_height square, centred
        side = target.glyph_height
        mx, my = x1 + (x2 - x1 - side) // 2, y1 + (y2 - y1 - side) // 2
        _draw_shape(draw, target.char, (mx, my, mx + side, my + side), target.ink)
        return
    gw, gh = glyph_size(target.glyph_height)
    gx, gy = x1 + (x2 - x1 - gw) // 2, y1 + (y2 - y1 - gh) // 2
    for rect in glyph_rects(target.char, gx, gy, target.glyph_height):
        _fill(draw, rect, target.ink)


# --- layout -----------------------------------------------------------------------------------------------

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, colour: RGB) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif shape == "square":
        _fill(draw, box, colour)
    else:
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=colour)


def _place_square(rng: random.Random, side: int, area: Box) -> Box:
    if area[2] - area[0] < side or area[3] - area[1] < side:
        raise ValueError(f"canvas too small: a {side} px box does not fit in {area}")
    x, y = rng.randint(area[0], area[2] - side), rng.randint(area[1], area[3] - side)
    return x, y, x + side, y + side


def _place_targets(rng: random.Random, count: int, side: int, area: Box, avoid: list[Box]) -> list[Box]:
    """Rejection sampling; a gap of one box side keeps targets visually separate and their borders checkable."""
    placed: list[Box] = []
    for _ in range(count * _MAX_TRIES):
        if len(placed) == count:
            break
        box = _place_square(rng, side, area)
        if not any(boxes_overlap(_pad(box, side), other) for other in avoid + placed):
            placed.append(box)
    if not placed:
        raise ValueError("canvas too small: no room for a fine target beside the big shape")
    return placed


def _make_targets(rng, max_count, targets: str, chars, glyph_height, area, avoid) -> tuple[Target, ...]:
    """One target for dots, else 1..max_count."""
    count = 1 if targets == "dots" else rng.randint(1, max_count)
    boxes = _place_targets(rng, count, box_side(glyph_height), area, avoid)
    borders = rng.sample(list(COLOURS), len(boxes))  # distinct, so "the small red box" is unambiguous
    if targets == "dots":  # the dot is the only coloured thing in its box
        colour = rng.choice(list(COLOURS))
        return (Target(boxes[0], colour, "dark", COLOURS[colour], glyph_height),)
    return tuple(Target(box, rng.choice(chars), border, rng.choice(INKS), glyph_height)
                 for box, border in zip(boxes, borders))


def _big_shape(rng: random.Random, width: int, height: int, area: Box) -> tuple[str, str, Box]:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    side = round(min(width, height) * rng.uniform(0.30, 0.45))
    return shape, colour, _place_square(rng, side, area)


def _hr_scene(rng: random.Random, width: int, height: int, glyph_height: int, targets: str) -> Scene:
    base = np.array(rng.choice(HR_BACKGROUNDS), dtype=np.int16)
    amp = rng.choice((0, 4, 6))  # 0 = plain; otherwise mild per-pixel noise so the background is not flat
    noise = np.random.default_rng(rng.getrandbits(64)).integers(-amp, amp + 1, size=(height, width, 1), dtype=np.int16)
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    margin = max(8, min(width, height) // 40)
    area = (margin, margin, width - margin, height - margin)
    shape, colour, shape_box = _big_shape(rng, width, height, area)
    _draw_shape(draw, shape, shape_box, COLOURS[colour])
    chars = SHAPES if targets == "marks" else DIGITS
    drawn = _make_targets(rng, 3, targets, chars, glyph_height, area, [shape_box])
    for target in drawn:
        _draw_target(draw, target)
    return Scene(image, "hr", shape, colour, shape_box, drawn)


def _draw_text_lines(rng: random.Random, draw: ImageDraw.ImageDraw, area: Box, glyph_height: int) -> None:
    # Bars about as tall as the target glyphs, so targets sit among text of the same scale.
    bar, pitch = max(4, round(glyph_height * 0.6)), max(8, round(glyph_height * 1.6))
    x0, y, x1, y1 = area
    while y + bar <= y1:
        if rng.random() >= 0.12:  # else: blank line between paragraphs
            right = x1 if rng.random() < 0.8 else x0 + round((x1 - x0) * rng.uniform(0.3, 0.8))
            x, word = x0, rng.randint(12, 70)
            while x + word <= right:
                _fill(draw, (x, y, x + word, y + bar), rng.choice(TEXT_GREYS))
                x, word = x + word + rng.randint(6, 10), rng.randint(12, 70)
        y += pitch


def _doc_scene(rng: random.Random, width: int, height: int, glyph_height: int, targets: str) -> Scene:
    image = Image.new("RGB", (width, height), PAGE)
    draw = ImageDraw.Draw(image)
    margin = max(16, width // 14)
    title_h = max(8, round(glyph_height * 1.6))
    _fill(draw, (margin, margin, margin + round((width - 2 * margin) * rng.uniform(0.4, 0.7)), margin + title_h),
          TITLE_GREY)
    body = (margin, margin + 3 * title_h, width - margin, height - margin)
    _draw_text_lines(rng, draw, body, glyph_height)
    shape, colour, shape_box = _big_shape(rng, width, height, body)
    figure = _pad(shape_box, max(4, glyph_height))  # white frame: the figure interrupts the text lines
    _fill(draw, figure, PAGE)
    _draw_shape(draw, shape, shape_box, COLOURS[colour])
    chars = SHAPES if targets == "marks" else DIGITS + LETTERS
    drawn = _make_targets(rng, 2, targets, chars, glyph_height, body, [figure])
    for target in drawn:
        _fill(draw, _pad(target.box, 4), PAGE)  # keep text bars off the border so it stays crisp
        _draw_target(draw, target)
    return Scene(image, "doc", shape, colour, shape_box, drawn)


# --- public generators -------------------------------------------------------------------------------------

def _settings(split: str, overrides: dict) -> dict:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    settings = {**_DEFAULT_SIZES[split], **_DEFAULT_GLYPH}
    unknown = set(overrides) - set(settings)
    if unknown:
        raise TypeError(f"unknown size override(s) {sorted(unknown)}; allowed: {sorted(settings)}")
    settings.update(overrides)
    if settings["targets"] not in TARGET_KINDS:
        raise ValueError(f"targets must be one of {', '.join(TARGET_KINDS)}; got {settings['targets']!r}")
    if settings["glyph_height"] - settings["glyph_jitter"] < 5 or settings["glyph_jitter"] < 0:
        raise ValueError("glyph_height - glyph_jitter must be >= 5 px (and glyph_jitter >= 0)")
    return settings


def make_scene(split: str, seed: int, index: int, **size_overrides) -> Scene:
    """The scene (image plus every object's box) of sample `index`; independent of any question choice."""
    s = _settings(split, size_overrides)
    rng = random.Random(stable_seed(seed, _SPLIT_CODE[split], index, _SCENE_STREAM))
    glyph_height = s["glyph_height"] + rng.randint(-s["glyph_jitter"], s["glyph_jitter"])
    build = _hr_scene if split == "hr" else _doc_scene
    return build(rng, s["width"], s["height"], glyph_height, s["targets"])


def _ask(rng: random.Random, scene: Scene, fine_fraction: float) -> tuple[str, str, str, str, Box]:
    if rng.random() < fine_fraction:
        target = rng.choice(scene.targets)
        where = "the small box" if len(scene.targets) == 1 else f"the small {target.border} box"
        if target.char in COLOURS:
            return f"What colour is the dot in {where}?", target.char, "fine", "dot", target.box
        what = "shape" if target.char in SHAPES else "digit" if target.char in DIGITS else "letter"
        return f"What {what} is in {where}?", target.char, "fine", "mark" if what == "shape" else what, target.box
    if rng.random() < 0.5:
        return "What colour is the big shape?", scene.colour, "coarse", "colour", scene.shape_box
    return "What shape is the big object?", scene.shape, "coarse", "shape", scene.shape_box


def make_sample(split: str, seed: int, index: int, *, fine_fraction: float = 0.5, **size_overrides) -> Sample:
    if not 0.0 <= fine_fraction <= 1.0:
        raise ValueError(f"fine_fraction must be in [0, 1], got {fine_fraction}")
    scene = make_scene(split, seed, index, **size_overrides)
    rng = random.Random(stable_seed(seed, _SPLIT_CODE[split], index, _QUESTION_STREAM))
    question, answer, kind, answer_set, box = _ask(rng, scene, fine_fraction)
    return Sample(scene.image, question, answer, kind, box, split, seed, index, answer_set)


def iter_samples(split: str, seed: int, start: int = 0, *, fine_fraction: float = 0.5,
                 **size_overrides) -> Iterator[Sample]:
    index = start
    while True:
        yield make_sample(split, seed, index, fine_fraction=fine_fraction, **size_overrides)
        index += 1


def generate(split: str, n: int, seed: int, *, fine_fraction: float = 0.5, **size_overrides) -> list[Sample]:
    """Samples 0..n-1 of (split, seed); overrides: width, height, glyph_height, glyph_jitter, targets."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [make_sample(split, seed, i, fine_fraction=fine_fraction, **size_overrides) for i in range(n)]


def write_dataset(samples: Iterable[Sample], out_dir) -> Path:
    """PNGs under out_dir/images and out_dir/data.jsonl (image paths relative to it); returns the jsonl path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jsonl = out / "data.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for sample in samples:
            # Named by (split, seed, index): the pixels depend on nothing else, so a repeat rewrites the same file.
            rel = f"images/{sample.split}_{sample.seed}_{sample.index:06d}.png"
            sample.image.save(out / rel)
            f.write(json.dumps(sample.to_record(rel)) + "\n")
    return jsonl

"""Stage 3 labels for the dynamic gate: answer ladders, consistency filter, per-load label draw, after
the reference implementation's `FineGrainedMultiScaleDataset` (github.com/YuHengsss/Q-Zoom).

1. `make_answer_ladders`: the model answers each question once per resolution of an explicit ascending
   ladder (in merged visual tokens; image at min = max = r x 28 x 28 pixels), plain direct decoding, no
   RoI pass. The source ladder, prompt and decoding are UNKNOWN (the reference's generator script is not
   published); the ladder is
   therefore a required argument.
2. `classify` (once, the reference's `_filter_for_hard_cases`): drop unstable samples (the two highest
   resolutions disagree), samples whose consensus contradicts the annotation, and non-monotone ones (a
   lower resolution right while a higher one is wrong); keep EASY (right everywhere) and HARD (only a
   prefix of the lowest resolutions wrong).
3. `draw_label` (at every load, the reference's `create_high_res_signal`): pick one non-top resolution
   and a label, 1 = "the answer at this resolution is wrong: zoom", 0 = "this resolution suffices".
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from ..config import MAX_BUDGET_TOKENS, EngineConfig, RequestOptions
from ..errors import InvalidInput
from ..synthetic import stable_seed
from ..types import Request
from .checkpoint import atomic_dir
from .data import Record, open_image

__all__ = ["normalize", "answers_match", "Ladder", "LadderSet", "classify", "draw_label", "GateDataset",
           "make_answer_ladders", "save_ladders", "load_ladders", "check_resolutions", "DROP_KINDS"]

IGNORE = -100
FORMAT = "qzoom-gate-ladders/1"
DROP_KINDS = ("unstable", "wrong_at_top", "non_monotone")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower-case, delete ASCII punctuation, strip (the reference's `norm`)."""
    return text.lower().translate(_PUNCT).strip()


def answers_match(a: str, b: str) -> bool:
    """Containment either way after `normalize` (the reference's `match`). OUR guard: an empty
    normalised string matches nothing (in the reference "" is contained in every answer)."""
    a, b = normalize(a), normalize(b)
    return bool(a) and bool(b) and (a in b or b in a)


@dataclass(frozen=True)
class Ladder:
    """One question answered at every resolution of `res` (ascending, tokens)."""

    uid: str
    row: int
    image: Path
    question: str
    answer: str  # the ground truth
    res: tuple[int, ...]
    answers: tuple[str, ...]


@dataclass
class LadderSet:
    settings: dict
    ladders: list[Ladder]


def classify(ladder: Ladder, top_group: int = 2) -> str:
    """'easy' | 'hard' | 'unstable' | 'wrong_at_top' | 'non_monotone' (the reference's `_filter_for_hard_cases`).

    OUR deviation: the ground truth is normalised like the answers (the reference only lower-cases and
    strips it, so "3.5" never matched a normalised "35" and such samples were dropped).
    """
    top = {normalize(a) for a in ladder.answers[-top_group:]}
    if len(top) != 1:
        return "unstable"
    consensus = ladder.answers[-1]
    if not answers_match(consensus, ladder.answer):
        return "wrong_at_top"
    wrong = [i for i, a in enumerate(ladder.answers) if not answers_match(a, consensus)]
    if not wrong:
        return "easy"
    return "hard" if wrong == list(range(len(wrong))) else "non_monotone"


def draw_label(ladder: Ladder, rng: random.Random, *, p_pos: float = 0.9, top_group: int = 2) -> tuple[int | None, int]:
    """(resolution index, label) or (None, -100) (the reference's `create_high_res_signal`, strategy "default").

    EASY: a uniform non-top resolution, label 0. HARD: with probability p_pos one of the LAST TWO wrong
    resolutions, label 1; otherwise a non-top resolution whose answer matches the consensus, label 0
    (ignore when there is none). The top `top_group` resolutions are the oracle, never inputs.
    """
    kind = classify(ladder, top_group)
    if kind in DROP_KINDS:
        return None, IGNORE
    consensus = ladder.answers[-1]
    below_top = len(ladder.answers) - top_group
    right = [i for i in range(below_top) if answers_match(ladder.answers[i], consensus)]
    if kind == "hard" and rng.random() < p_pos:
        wrong = [i for i, a in enumerate(ladder.answers) if not answers_match(a, consensus)]
        return rng.choice(wrong[-2:]), 1
    if not right:
        return None, IGNORE
    return rng.choice(right), 0


@dataclass
class GateDataset:
    """The filtered stage-3 pool; `draw(epoch)` re-draws every label (seeded by seed, epoch, index)."""

    items: list[Ladder]
    seed: int = 0
    p_pos: float = 0.9
    top_group: int = 2
    prompt_suffix: str = ""
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_ladders(cls, ladders: LadderSet | list[Ladder], *, seed: int = 0, easy_ratio: float = 1.0,
                     max_samples: int | None = None, p_pos: float = 0.9, top_group: int = 2) -> "GateDataset":
        """HARD + a seeded sample of min(#easy, easy_ratio x #hard) EASY (reference: unseeded 1:1), then,
        with `max_samples`, a seeded shuffle truncated to that many (the reference's `roi_samples`)."""
        suffix = ladders.settings.get("prompt_suffix", "") if isinstance(ladders, LadderSet) else ""
        pool = ladders.ladders if isinstance(ladders, LadderSet) else ladders
        kinds = {k: [] for k in ("easy", "hard", *DROP_KINDS)}
        for ladder in pool:
            kinds[classify(ladder, top_group)].append(ladder)
        rng = random.Random(seed)
        easy = rng.sample(kinds["easy"], min(len(kinds["easy"]), int(easy_ratio * len(kinds["hard"]))))
        items = kinds["hard"] + easy
        if max_samples is not None:
            random.Random(seed).shuffle(items)
            items = items[:max_samples]
        stats = {k: len(v) for k, v in kinds.items()} | {"kept": len(items), "easy_kept": len(easy)}
        return cls(items, seed, p_pos, top_group, suffix, stats)

    def draw(self, epoch: int) -> list[tuple[Ladder, int, int]]:
        """[(ladder, resolution in tokens, label 0/1)] for one epoch; ignored draws are left out."""
        out = []
        for idx, ladder in enumerate(self.items):
            i, y = draw_label(ladder, random.Random(stable_seed(self.seed, epoch, idx)), p_pos=self.p_pos,
                              top_group=self.top_group)
            if y != IGNORE:
                out.append((ladder, ladder.res[i], y))
        return out

    def split(self, fraction: float) -> tuple["GateDataset", "GateDataset"]:
        """(train, held out): a `fraction` of the filtered pool, chosen by a shuffle seeded with `seed`, is
        held out (for `train_heads.gate_calibration`)."""
        if not 0.0 <= fraction < 1.0:
            raise InvalidInput(f"the held-out fraction must be in [0, 1); got {fraction}")
        items = list(self.items)
        random.Random(self.seed).shuffle(items)
        n = int(round(fraction * len(items)))
        return replace(self, items=items[n:]), replace(self, items=items[:n])


def check_resolutions(resolutions, top_group: int = 2) -> tuple[int, ...]:
    res = tuple(int(r) for r in resolutions)
    if len(res) <= top_group or any(b <= a for a, b in zip(res, res[1:])) or not 1 <= res[0] <= res[-1] <= 16384:
        raise InvalidInput(f"resolutions must be > {top_group} strictly ascending token counts in [1, 16384]; "
                           f"got {list(res)}")
    return res


def make_answer_ladders(loaded, records: list[Record], resolutions, *, prompt_suffix: str = "",
                        max_new_tokens: int = 16, zoom_top: int = 0, progress: bool = False) -> LadderSet:
    """Answer every record at every resolution with the engine's direct route (no gate, no RoI).

    `zoom_top` > 0 (OUR deviation, not the paper's): the highest `zoom_top` rungs are answered through
    the zoom route instead (coarse view at that budget + the checkpoint's SD-RPN RoI), so they act as
    the oracle for a model that reads fine detail only through the zoom — a small model may never read
    it directly at any resolution, and then every fine sample would be dropped as wrong at the top.
    """
    from ..engine import QZoomEngine

    res = check_resolutions(resolutions)
    if not 0 <= zoom_top <= len(res):
        raise InvalidInput(f"zoom_top must be between 0 and {len(res)} (the ladder's length); got {zoom_top}")
    if zoom_top and not loaded.branches.has_rpn:
        raise InvalidInput("zoom_top needs a checkpoint with a trained SD-RPN (twig) branch: train stage 1 first")
    modes = ["direct"] * (len(res) - zoom_top) + ["zoom"] * zoom_top
    # The ladder is exact resolutions: a small image is enlarged to each rung, as the reference does.
    engine = QZoomEngine(loaded, EngineConfig(max_new_tokens=max_new_tokens, max_batch_size=len(res),
                                              allow_upscale=True, max_visual_tokens=MAX_BUDGET_TOKENS))
    token_pixels = loaded.factor**2
    ladders = []
    for record in tqdm(records, desc="gate-labels", disable=not progress):
        image = open_image(record.image, record.where())
        requests = [Request(image, record.question, RequestOptions(
            mode=mode, min_pixels=r * token_pixels, max_pixels=r * token_pixels, prompt_suffix=prompt_suffix,
        )) for r, mode in zip(res, modes)]
        answers = tuple(result.answer for result in engine.answer(requests))
        ladders.append(Ladder(record.uid, record.row, record.image, record.question, record.answer, res, answers))
    settings = dict(resolutions=list(res), prompt_suffix=prompt_suffix, max_new_tokens=max_new_tokens,
                    zoom_top=zoom_top, model=loaded.model_id)
    return LadderSet(settings, ladders)


def save_ladders(ladders: LadderSet, out_dir: str | Path) -> Path:
    """`out_dir/ladders.json`, written atomically; image paths relative to `out_dir`."""
    out = Path(out_dir).resolve()
    rows = [asdict(lad) | {"image": os.path.relpath(Path(lad.image).resolve(), out)} for lad in ladders.ladders]
    with atomic_dir(out, "ladders.json") as tmp:
        doc = {"format": FORMAT, "settings": ladders.settings, "samples": rows}
        (tmp / "ladders.json").write_text(json.dumps(doc, indent=1))
    return out


def load_ladders(path: str | Path) -> LadderSet:
    root = Path(path)
    file = root / "ladders.json" if root.is_dir() else root
    try:
        doc = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{file}: not a gate ladder file ({e})") from None
    if doc.get("format") != FORMAT:
        raise InvalidInput(f"{file}: unknown ladder format {doc.get('format')!r}; expected {FORMAT}")
    ladders = []
    for n, m in enumerate(doc["samples"], start=1):
        if len(m["res"]) != len(m["answers"]):
            raise InvalidInput(f"{file}: sample {n}: {len(m['res'])} resolutions but {len(m['answers'])} answers")
        ladders.append(Ladder(m["uid"], m["row"], file.parent / m["image"], m["question"], m["answer"],
                              tuple(m["res"]), tuple(m["answers"])))
    return LadderSet(doc["settings"], ladders)

"""Training records: a JSONL file of (image, question, answer) rows, validated up front.

One JSON object per line with string keys `image` (path relative to the JSONL file, or absolute),
`question` and `answer`; every other key is kept in `Record.extra` (e.g. `target_box`, `kind`, `mode`,
`id`). This is the layout `qzoom_service.synthetic.write_dataset` writes. Blank lines are skipped.
Any bad row raises `InvalidInput` naming the file and the 1-based line number, before any model work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import InvalidInput

__all__ = ["Record", "load_records", "open_image", "image_size", "meaningful_token_ids"]

_REQUIRED = ("image", "question", "answer")


@dataclass(frozen=True)
class Record:
    """One training row. `image` is resolved to an absolute path; `row` is the 1-based line number."""

    image: Path
    question: str
    answer: str
    row: int
    source: Path
    extra: dict = field(default_factory=dict)

    @property
    def uid(self) -> str:
        """A stable id: the row's own `id` key when present, else `<file name>:<line>`."""
        return str(self.extra.get("id", f"{self.source.name}:{self.row}"))

    def where(self) -> str:
        return f"{self.source}: row {self.row}"


def meaningful_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (an answer made only of those teaches nothing)."""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    return [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i not in special]


def load_records(path: str | Path, *, tokenizer=None, check_images: bool = True) -> list[Record]:
    """Read and validate every row of a JSONL dataset.

    Errors (all `InvalidInput`, naming file and row): unreadable file, a line that is not a JSON object,
    a missing or non-string required key, an empty question or answer, an answer that tokenizes to no
    ordinary token (when `tokenizer` is given), an image file that does not exist (when `check_images`),
    and a file with no rows at all.
    """
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{source}: cannot read the dataset ({e})") from None
    records = []
    for row, line in enumerate(lines, start=1):
        if line.strip():
            records.append(_parse_row(line, row, source, tokenizer, check_images))
    if not records:
        raise InvalidInput(f"{source}: the dataset is empty (no JSON rows)")
    return records


def _parse_row(line: str, row: int, source: Path, tokenizer, check_images: bool) -> Record:
    where = f"{source}: row {row}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in _REQUIRED:
        if key not in obj:
            raise InvalidInput(f"{where}: missing required key {key!r}")
        if not isinstance(obj[key], str):
            raise InvalidInput(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj[key].strip():
            raise InvalidInput(f"{where}: {key!r} is empty")
    if tokenizer is not None and not meaningful_token_ids(tokenizer, obj["answer"]):
        raise InvalidInput(f"{where}: answer {obj['answer']!r} tokenizes to no ordinary token")
    image = Path(obj["image"])
    image = image if image.is_absolute() else source.parent / image
    if check_images and not image.is_file():
        raise InvalidInput(f"{where}: image file {image} does not exist")
    extra = {k: v for k, v in obj.items() if k not in _REQUIRED}
    return Record(image=image, question=obj["question"], answer=obj["answer"], row=row, source=source, extra=extra)


def open_image(path: Path, where: str) -> Image.Image:
    """Decode an image file to RGB; a missing or corrupt file raises `InvalidInput` naming `where`."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise InvalidInput(f"{where}: image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidInput(f"{where}: image file {path} is not a readable image ({e})") from None


def image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise InvalidInput(f"{where}: image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidInput(f"{where}: image file {path} is not a readable image ({e})") from None

"""Training JSONL: good rows load with extra keys kept; every bad row fails naming its file and row."""

from __future__ import annotations

import json

import pytest

from qzoom_service.errors import InvalidInput
from qzoom_service.tiny import _build_tokenizer
from qzoom_service.train.data import load_records, open_image

from ..helpers import make_image


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    make_image(40, 30).save(tmp_path / "images" / "a.png")
    return tmp_path


GOOD = {"image": "images/a.png", "question": "What?", "answer": "red"}


def _write(folder, rows) -> str:
    path = folder / "data.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_good_rows_load_with_paths_relative_to_the_file_and_extra_keys(folder):
    path = _write(folder, [GOOD, "", {**GOOD, "target_box": [1, 2, 3, 4], "id": "s7"}])
    first, second = load_records(path, tokenizer=_build_tokenizer())
    assert first.image == folder / "images" / "a.png" and first.row == 1 and first.uid == "data.jsonl:1"
    assert second.row == 3 and second.extra == {"target_box": [1, 2, 3, 4], "id": "s7"} and second.uid == "s7"


@pytest.mark.parametrize("bad,message", [
    ('{"image": "images/a.png", "question": "What?"', "not valid JSON"),
    ('["images/a.png", "What?", "red"]', "expected a JSON object"),
    ({"image": "images/a.png", "question": "What?"}, "missing required key 'answer'"),
    ({**GOOD, "answer": 3}, "'answer' must be a string"),
    ({**GOOD, "answer": "  "}, "'answer' is empty"),
    ({**GOOD, "question": ""}, "'question' is empty"),
    ({**GOOD, "image": "images/missing.png"}, "missing.png does not exist"),
    ({**GOOD, "answer": "<|im_end|>"}, "tokenizes to no ordinary token"),
])
def test_a_bad_row_fails_naming_file_and_row(folder, bad, message):
    path = _write(folder, [GOOD, bad])
    with pytest.raises(InvalidInput, match=message) as err:
        load_records(path, tokenizer=_build_tokenizer())
    assert f"{path}: row 2" in err.value.message


def test_an_empty_dataset_fails_naming_the_file(folder):
    path = _write(folder, ["", "  "])
    with pytest.raises(InvalidInput, match=r"data\.jsonl: the dataset is empty"):
        load_records(path)


def test_a_corrupt_image_fails_when_opened_naming_the_row(folder):
    (folder / "images" / "bad.png").write_bytes(b"not a png")
    (record,) = load_records(_write(folder, [{**GOOD, "image": "images/bad.png"}]))
    with pytest.raises(InvalidInput, match=r"row 1: image file .*bad\.png is not a readable image"):
        open_image(record.image, record.where())

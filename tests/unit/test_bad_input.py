"""Bad requests raise a typed error naming the problem, before any model work; the engine keeps serving."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image

from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine
from qzoom_service.errors import ImageTooLarge, InvalidInput, LimitExceeded
from qzoom_service.types import Request

from ..helpers import TINY_BUDGET, make_image, png



def _claimed_size_png(width: int, height: int) -> bytes:
    """A small real PNG whose header claims width x height: a decompression bomb is caught from the header."""
    data = bytearray(png(Image.new("RGB", (8, 8))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture()
def spy_engine(tiny_loaded, monkeypatch):
    """An engine whose vision tower records calls, to prove validation happens before model work."""
    engine = QZoomEngine(tiny_loaded, EngineConfig(max_image_pixels=2_000_000, max_new_tokens=4, **TINY_BUDGET))
    calls = []
    original = type(engine.model.model.visual).forward
    monkeypatch.setattr(type(engine.model.model.visual), "forward",
                        lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    return engine, calls


GOOD = png(make_image(200, 150))


@pytest.mark.parametrize(
    "image,question,options,error,message",
    [
        (b"not an image at all", "q?", RequestOptions(), InvalidInput, "not a readable image"),
        (GOOD[: len(GOOD) // 2], "q?", RequestOptions(), InvalidInput, "truncated or corrupt"),
        (b"", "q?", RequestOptions(), InvalidInput, "image is empty"),
        (Image.new("RGB", (0, 0)), "q?", RequestOptions(), InvalidInput, "zero size"),
        (_claimed_size_png(2_000, 2_000), "q?", RequestOptions(), ImageTooLarge, "4000000 pixels; the limit is 2000000"),
        (_claimed_size_png(40_000, 40_000), "q?", RequestOptions(), ImageTooLarge, "decompression bomb"),
        (Image.new("RGB", (3000, 3000)), "q?", RequestOptions(), ImageTooLarge, "9000000 pixels"),
        # Over the processor's aspect-ratio limit only once 30 px rounds to 28: 8008 / 28 = 286.
        (png(Image.new("RGB", (8000, 30))), "q?", RequestOptions(), InvalidInput, "aspect ratio of 286"),
        (Image.new("RGB", (30, 5628)), "q?", RequestOptions(), InvalidInput, "aspect ratio of 201"),
        (GOOD, "   ", RequestOptions(), InvalidInput, "question is empty"),
        (GOOD, "q?", RequestOptions(mode="sometimes"), InvalidInput, "mode must be one of"),
        (GOOD, "q?", RequestOptions(gate_threshold=1.5), InvalidInput, r"gate_threshold must be a probability"),
        (GOOD, "q?", RequestOptions(roi_threshold=float("nan")), InvalidInput, "roi_threshold"),
        (GOOD, "q?", RequestOptions(min_pixels=10), InvalidInput, "between 784"),
        (GOOD, "q?", RequestOptions(min_pixels=200 * 784, max_pixels=100 * 784), InvalidInput, "larger than maximum"),
        (GOOD, "q?", RequestOptions(max_new_tokens=0), InvalidInput, "max_new_tokens"),
    ],
)
def test_bad_request_raises_typed_error_before_model_work(spy_engine, image, question, options, error, message):
    engine, calls = spy_engine
    with pytest.raises(error, match=message):
        engine.answer([Request(image, question, options)])
    assert calls == []
    ok = engine.answer([Request(GOOD, "q?", RequestOptions(mode="direct"))])[0]  # still serving
    assert ok.route == "direct" and calls == [1]


def test_one_bad_request_in_a_batch_is_named(spy_engine):
    engine, calls = spy_engine
    with pytest.raises(InvalidInput, match="request 1: question is empty"):
        engine.answer([Request(GOOD, "fine"), Request(GOOD, "")])
    assert calls == []


def test_error_codes_are_grpc_status_names():
    assert InvalidInput.code == "INVALID_ARGUMENT" and ImageTooLarge.code == "RESOURCE_EXHAUSTED"


def test_bad_engine_config_is_rejected():
    with pytest.raises(InvalidInput, match="unknown engine config keys: colour"):
        EngineConfig.from_dict({"colour": "red"})
    with pytest.raises(InvalidInput, match="dtype must be"):
        EngineConfig(dtype="int8")
    with pytest.raises(InvalidInput, match="QZOOM_MAX_NEW_TOKENS='many'"):
        EngineConfig.from_env({"QZOOM_MAX_NEW_TOKENS": "many"})
    assert EngineConfig.from_env({"QZOOM_DEVICE": "cuda", "QZOOM_REUSE_SRC_POS": "false"}).reuse_src_pos is False


# -- the cost model: what a request may make the model encode ------------------------------------------------


def _visual_tokens(prepared) -> int:
    return int(prepared.grid_thw[0].prod()) // prepared.merge_size**2


def test_a_small_image_is_not_enlarged_past_its_pixels_and_the_engines_minimum(tiny_loaded):
    f2 = tiny_loaded.factor**2
    big = RequestOptions(min_pixels=144 * f2, max_pixels=144 * f2, zoom_min_pixels=144 * f2, zoom_max_pixels=144 * f2)
    tiny, mid = png(make_image(12, 12)), png(make_image(10 * tiny_loaded.factor, 10 * tiny_loaded.factor))
    engine = QZoomEngine(tiny_loaded, EngineConfig(**TINY_BUDGET))
    at_minimum = engine.prepare(Request(tiny, "q?", big))
    assert _visual_tokens(at_minimum) == 64  # the engine's own minimum stays allowed (the reference's resize)
    assert at_minimum.options.zoom_min_pixels == TINY_BUDGET["min_pixels"]
    own_size = engine.prepare(Request(mid, "q?", big))
    assert _visual_tokens(own_size) == 100 and own_size.options.min_pixels == 100 * f2
    upscaling = QZoomEngine(tiny_loaded, EngineConfig(allow_upscale=True, **TINY_BUDGET))
    assert _visual_tokens(upscaling.prepare(Request(tiny, "q?", big))) == 144


def test_cost_limits_are_refused_before_model_work_and_named(spy_engine):
    engine, calls = spy_engine
    with pytest.raises(LimitExceeded, match="max_prompt_tokens is 2048"):
        engine.answer([Request(GOOD, "q?", RequestOptions(prompt_suffix="ab" * 2100))])
    with pytest.raises(LimitExceeded, match="max_visual_tokens is 4096"):
        engine.answer([Request(GOOD, "q?", RequestOptions(max_pixels=4097 * engine.loaded.factor**2))])
    assert calls == [] and LimitExceeded.code == "RESOURCE_EXHAUSTED"


def test_cost_limits_are_validated_in_the_engine_config(tiny_loaded):
    with pytest.raises(InvalidInput, match="max_visual_tokens in"):
        EngineConfig(max_visual_tokens=0)
    with pytest.raises(LimitExceeded, match="max_pixels=.*max_visual_tokens is 10"):
        QZoomEngine(tiny_loaded, EngineConfig(max_visual_tokens=10, **TINY_BUDGET))
    assert EngineConfig.from_env({"QZOOM_ALLOW_UPSCALE": "true", "QZOOM_MAX_PROMPT_TOKENS": "64"}).allow_upscale

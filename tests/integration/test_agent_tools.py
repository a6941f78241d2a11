"""Tool profiles end to end against a real `qzoom serve`: the recorded example calls crop what they say,
boxes round-trip through the server's original pixels (nested crops included), service errors become
readable ToolErrors, and a session stays usable after every failure."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from qzoom_client import QZoomClient, coords
from qzoom_client.tools import PROFILES, ToolError, ToolSession, parse_grounding, parse_tool_calls

from ..helpers import make_image, png

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "tool_calls"
CROP1 = [672, 504, 1344, 1008]
# One call per profile that makes image 1 of the fixtures' conversation: the crop CROP1 of image 0.
SETUP = {
    "generic": ("zoom_region", {"image_id": "$image", "bbox": [500, 500, 1000, 1000]}),
    "deepeyes": ("image_zoom_in_tool", {"bbox_2d": CROP1}),
    "qwen3vl": ("image_zoom_in_tool", {"bbox_2d": [500, 500, 1000, 1000], "label": "quarter", "img_idx": 0}),
    "pixel_reasoner": ("crop_image_normalized", {"bbox_2d": [0.6, 0.6, 0.9, 0.9], "target_image": 1}),
    "mini_o3": ("grounding", {"bbox_2d": [0.5, 0.5, 1.0, 1.0], "source": "original_image"}),
}



IMAGE = png(make_image(1344, 1008, seed=41))  # the size the fixtures' boxes assume; this module's own crops


@pytest.fixture(scope="module")
def client(qzoom_serve):
    with QZoomClient(qzoom_serve, timeout=120) as c:
        yield c


def conversation(client, profile: str) -> tuple[ToolSession, dict]:
    """A session with image 0 (the demo image) and image 1 (its crop CROP1), as the fixtures assume."""
    session = ToolSession(client, profile)
    image = session.add_image(IMAGE)
    assert (image.width, image.height) == (1344, 1008)
    name, arguments = SETUP[profile]
    arguments = json.loads(json.dumps(arguments).replace("$image", image.image_id))
    crop = session.call(name, arguments)
    assert crop.data["box"]["original"] == CROP1 and crop.observation.index == 1
    return session, {"$image": image.image_id, "$crop1": crop.data["crop_id"]}


def as_calls(profile: str, example: dict, names: dict) -> list[tuple[str, object]]:
    def sub(text):
        for key, value in names.items():
            text = text.replace(key, value)
        return text

    if "text" in example:
        parse = parse_grounding if profile == "mini_o3" else parse_tool_calls
        return [(c.name, c.arguments) for c in parse(sub(example["text"]))]
    return [(example["name"], sub(example["arguments"]))]


def examples(profile: str, kind: str, stage: str | None = None) -> list[dict]:
    data = json.loads((FIXTURES / f"{profile}.json").read_text())[kind]
    return [e for e in data if stage is None or e.get("stage", "client") == stage]


def png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


@pytest.mark.parametrize("profile", PROFILES)
def test_recorded_good_calls_crop_the_recorded_boxes(client, profile):
    session, names = conversation(client, profile)
    for example in examples(profile, "good"):
        name, arguments = as_calls(profile, example, names)[0]
        before = len(session.images)
        result = session.call(name, arguments)
        x1, y1, x2, y2 = example["box_original"]
        assert result.data["box"]["original"] == [x1, y1, x2, y2], example
        assert png_size(result.png) == (x2 - x1, y2 - y1) == (result.data["width"], result.data["height"])
        assert result.observation.index == before == result.data["img_idx"] and len(session.images) == before + 1
        assert result.data["source_idx"] == example["target"]["source"]
        assert result.data_url().startswith("data:image/png;base64,")


@pytest.mark.parametrize("profile", PROFILES)
def test_boxes_round_trip_through_the_servers_original_pixels(client, profile):
    """The box the server cropped, mapped back into the source image's frame, is the box that was asked
    for (up to the server's whole-pixel rounding)."""
    from qzoom_client.tools import plan_zoom

    session, names = conversation(client, profile)
    for example in examples(profile, "good"):
        name, arguments = as_calls(profile, example, names)[0]
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        target = plan_zoom(profile, name, arguments, session.images)
        result = session.call(name, arguments)
        src = target.source
        ox, oy = src.box[:2] if src.box else (0, 0)
        x1, y1, x2, y2 = result.data["box"]["original"]
        back = coords.from_original([x1 - ox, y1 - oy, x2 - ox, y2 - oy], target.space, (src.width, src.height))
        one_pixel = coords.from_original([1, 1, 1, 1], target.space, (src.width, src.height))
        for got, want, tol in zip(back, target.box, one_pixel * 2):
            assert abs(got - want) <= tol, (example, back, target.box)


@pytest.mark.parametrize("profile", PROFILES)
def test_bad_calls_become_tool_errors_and_the_session_goes_on(client, profile):
    for example in examples(profile, "bad"):
        session, names = conversation(client, profile)
        retry_name, retry_arguments = as_calls(profile, examples(profile, "good")[0], names)[0]
        before = session.images
        with pytest.raises(ToolError) as info:
            for name, arguments in as_calls(profile, example, names):
                session.call(name, arguments)
        assert info.value.text.startswith("Error: ")
        assert example["error"] in info.value.text and info.value.code == "INVALID_ARGUMENT"
        assert session.images == before  # a failed call leaves the conversation as it was
        assert session.call(retry_name, retry_arguments).observation.index == len(before)


def test_answer_runs_the_services_own_zoom_path(client):
    session, _ = conversation(client, "qwen3vl")
    result = session.call("answer", {"question": "What colour is the big shape?"})
    assert result.png is None and result.data["route"] in ("direct", "zoom")
    assert result.data["image_id"] == session.images[0].image_id and result.text == result.data["answer"]
    with pytest.raises(ToolError) as info:
        session.call("answer", {"question": ""})
    assert info.value.text.startswith("Error: invalid arguments for answer: question: ")
    assert info.value.text.endswith("Expected: answer(question, image_id?)")


def test_the_crop_cap_is_a_readable_resource_error_and_existing_crops_stay_usable(client):
    """The default server caps crops per image (64); the 65th new crop is refused, a known one is not."""
    session = ToolSession(client, "generic")
    image_id = session.add_image(png(make_image(320, 240, seed=55))).image_id
    made = 0
    with pytest.raises(ToolError) as info:
        for made in range(1000):
            session.call("zoom_region", {"image_id": image_id, "bbox": [0, 0, 100 + made, 100], "coord_space": "pixel"})
    assert info.value.code == "RESOURCE_EXHAUSTED" and "the limit is" in info.value.text and made >= 1
    again = session.call("zoom_region", {"image_id": image_id, "bbox": [0, 0, 100, 100], "coord_space": "pixel"})
    assert again.data["crop_id"] == session.images[1].crop_id

"""Tool profiles against recorded example calls (tests/fixtures/tool_calls): every good call validates and
resolves to the expected image, space and box; every bad call that the client can judge becomes a
ToolError with readable text; boxes round-trip between a profile's space and original pixels."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qzoom_client import coords
from qzoom_client.tools import (PROFILES, Observation, Target, ToolCall, ToolError, parse_arguments,
                                parse_grounding, parse_tool_calls, plan_zoom, tool_definition)
from qzoom_client.tools.openai_tools import chat_tools, responses_tools

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tool_calls"
IMAGE, CROP = "ab" * 32, "crop-0123456789abcdef01234567"
CONVERSATION = [Observation(0, IMAGE, None, 1344, 1008),
                Observation(1, IMAGE, CROP, 672, 504, box=(672, 504, 1344, 1008))]


def load_examples(kind: str, stage: str | None = None):
    for profile in PROFILES:
        data = json.loads((FIXTURES / f"{profile}.json").read_text())
        assert data["profile"] == profile
        for i, example in enumerate(data[kind]):
            if stage is None or example.get("stage", "client") == stage:
                yield pytest.param(profile, example, id=f"{profile}-{kind}{i}")


def substitute(text: str) -> str:
    return text.replace("$image", IMAGE).replace("$crop1", CROP)


def first_call(profile: str, example: dict) -> ToolCall:
    """The example as a call: parsed from the model's text, or function-calling name + arguments."""
    if "text" in example:
        parse = parse_grounding if profile == "mini_o3" else parse_tool_calls
        return parse(substitute(example["text"]))[0]
    return ToolCall(example["name"], parse_arguments(example["name"], substitute(example["arguments"])))


def original_box(target) -> list[float]:
    """Mirror of the server: the box in the source's space -> original pixels of the uploaded image."""
    src = target.source
    x1, y1, x2, y2 = coords.to_original(target.box, target.space, (src.width, src.height))
    ox, oy = src.box[:2] if src.box else (0, 0)
    return [x1 + ox, y1 + oy, x2 + ox, y2 + oy]


@pytest.mark.parametrize("profile,example", list(load_examples("good")))
def test_good_calls_resolve_to_the_recorded_target(profile, example):
    call = first_call(profile, example)
    target = plan_zoom(profile, call.name, call.arguments, CONVERSATION)
    want = example["target"]
    assert (target.source.index, target.space) == (want["source"], want["space"])
    assert list(target.box) == pytest.approx(want["box"])
    # What the service will crop: it snaps float noise (6 decimals), truncates the top-left corner and
    # rounds the bottom-right one.
    x1, y1, x2, y2 = (round(v, 6) for v in original_box(target))
    assert [int(x1), int(y1), round(x2), round(y2)] == example["box_original"]


@pytest.mark.parametrize("profile,example", list(load_examples("bad", stage="client")))
def test_bad_calls_become_readable_tool_errors(profile, example):
    with pytest.raises(ToolError) as info:
        call = first_call(profile, example)
        plan_zoom(profile, call.name, call.arguments, CONVERSATION)
    assert example["error"] in info.value.text and info.value.text.startswith("Error: ")
    assert info.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("profile", PROFILES)
def test_a_schema_error_names_the_expected_call(profile):
    with pytest.raises(ToolError) as info:
        plan_zoom(profile, tool_definition(profile)["name"], {}, CONVERSATION)
    assert f"Expected: {tool_definition(profile)['name']}(" in info.value.text


@pytest.mark.parametrize("name", PROFILES + ("answer",))
def test_schemas_are_valid_and_in_the_plain_openai_shape(name):
    """Draft 2020-12 schemas, and only type/properties/required (Qwen-Agent's BaseTool insists)."""
    tool = tool_definition(name)
    assert set(tool) == {"name", "description", "parameters"}
    jsonschema.Draft202012Validator.check_schema(tool["parameters"])
    assert set(tool["parameters"]) == {"type", "properties", "required"}
    assert set(tool["parameters"]["required"]) <= set(tool["parameters"]["properties"])


@pytest.mark.parametrize("profile", PROFILES)
def test_openai_definitions_carry_the_same_schema(profile):
    chat, responses = chat_tools(profile), responses_tools(profile)
    assert chat[0] == {"type": "function", "function": tool_definition(profile)}
    assert {k: responses[0][k] for k in ("name", "description", "parameters")} == tool_definition(profile)
    assert responses[0]["type"] == "function" and responses[0]["strict"] is False
    assert [t["function"]["name"] for t in chat][1:] == ["answer"] and len(chat_tools(profile, answer=False)) == 1


def test_deepeyes_boxes_in_a_shown_resized_copy_are_rescaled():
    shown = [Observation(0, IMAGE, None, 1344, 1008, shown_size=(756, 560))]
    target = plan_zoom("deepeyes", "image_zoom_in_tool", {"bbox_2d": [378, 280, 756, 560]}, shown)
    assert target.space == "norm1" and list(target.box) == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert original_box(target) == pytest.approx([672, 504, 1344, 1008])


def test_a_conversation_without_images_says_to_upload_first():
    with pytest.raises(ToolError, match="no image in this conversation"):
        plan_zoom("qwen3vl", "image_zoom_in_tool", {"bbox_2d": [0, 0, 1, 1], "label": "x", "img_idx": 0}, [])


@settings(max_examples=200, deadline=None)
@given(space=st.sampled_from(["original", "norm1000", "norm1"]),
       crop=st.tuples(st.integers(0, 600), st.integers(0, 500), st.integers(28, 700), st.integers(28, 500)),
       rel=st.tuples(st.floats(0, 0.5), st.floats(0, 0.5), st.floats(0.5, 1), st.floats(0.5, 1)))
def test_boxes_round_trip_through_original_pixels_of_nested_crops(space, crop, rel):
    """A box relative to a crop, mapped to original pixels and back, is the box it was (any space)."""
    x, y, w, h = crop
    source = Observation(1, IMAGE, CROP, w, h, box=(x, y, x + w, y + h))
    size = (w, h)
    box = coords.from_original([rel[0] * w, rel[1] * h, rel[2] * w, rel[3] * h], space, size)
    absolute = original_box(Target(source, tuple(box), space))
    assert x <= absolute[0] <= absolute[2] <= x + w + 1e-6
    back = coords.from_original([absolute[0] - x, absolute[1] - y, absolute[2] - x, absolute[3] - y], space, size)
    assert back == pytest.approx(box, abs=1e-9)

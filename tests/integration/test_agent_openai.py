"""OpenAI-style dispatchers against a real `qzoom serve`: the Responses `function_call_output` carries the
crop as an `input_image`; Chat Completions gets text-only tool messages plus one user message with the
crops (what vLLM-served Qwen models accept)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from qzoom_client import QZoomClient
from qzoom_client.tools import ToolSession
from qzoom_client.tools.openai_tools import run_chat_tool_calls, run_responses_call

from ..helpers import make_image, png



@pytest.fixture(scope="module")
def session(qzoom_serve):
    with QZoomClient(qzoom_serve, timeout=120) as client:
        s = ToolSession(client, "generic")
        s.add_image(png(make_image(800, 600, seed=42)))
        yield s


def _decode(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):])))


def _zoom_arguments(session, **extra) -> str:
    return json.dumps({"image_id": session.images[0].image_id, "bbox": [0, 0, 500, 500], **extra})


def test_responses_output_holds_text_and_the_crop_as_input_image(session):
    item = {"type": "function_call", "call_id": "call_a", "name": "zoom_region", "arguments": _zoom_arguments(session)}
    out = run_responses_call(session, item)
    assert out["type"] == "function_call_output" and out["call_id"] == "call_a"
    text, image = out["output"]
    assert text["type"] == "input_text" and json.loads(text["text"])["box_original"] == [0, 0, 400, 300]
    assert image["type"] == "input_image" and _decode(image["image_url"]).size == (400, 300)


def test_responses_errors_and_answers_are_text_outputs(session):
    bad = run_responses_call(session, {"type": "function_call", "call_id": "c", "name": "zoom_region",
                                       "arguments": '{"bbox": [0, 0, 1, 1]}'})
    assert bad["call_id"] == "c" and bad["output"].startswith("Error: invalid arguments for zoom_region")
    answer = run_responses_call(session, {"type": "function_call", "call_id": "d", "name": "answer",
                                          "arguments": '{"question": "What colour is the box?"}'})
    assert isinstance(answer["output"], str) and answer["call_id"] == "d"


def test_chat_tool_messages_are_text_then_one_user_message_carries_the_crops(session):
    def call(call_id: str, arguments: str) -> dict:
        return {"id": call_id, "type": "function", "function": {"name": "zoom_region", "arguments": arguments}}

    message = {"role": "assistant", "content": None, "tool_calls": [
        call("call_1", _zoom_arguments(session)),
        call("call_2", '{"image_id": 1}'),
        call("call_3", _zoom_arguments(session, coord_space="norm1", bbox=[0.5, 0.5, 1, 1])),
    ]}
    tool_1, tool_2, tool_3, user = run_chat_tool_calls(session, message)
    assert [m["role"] for m in (tool_1, tool_2, tool_3)] == ["tool"] * 3
    assert [m["tool_call_id"] for m in (tool_1, tool_2, tool_3)] == ["call_1", "call_2", "call_3"]
    assert all(isinstance(m["content"], str) for m in (tool_1, tool_2, tool_3))
    assert tool_2["content"].startswith("Error: ") and "image_id: 1 is not of type 'string'" in tool_2["content"]
    assert user["role"] == "user"
    images = [part for part in user["content"] if part["type"] == "image_url"]
    assert [_decode(p["image_url"]["url"]).size for p in images] == [(400, 300), (400, 300)]
    assert [p["text"] for p in user["content"] if p["type"] == "text"] == ["Crop from tool call call_1:",
                                                                          "Crop from tool call call_3:"]


def test_chat_turn_without_a_crop_adds_no_user_message(session):
    message = {"role": "assistant", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "nope", "arguments": "{}"}}]}
    error = "Error: unknown tool 'nope'; the tools are zoom_region and answer"
    assert run_chat_tool_calls(session, message) == [{"role": "tool", "tool_call_id": "x", "content": error}]

"""The LangChain and Qwen-Agent tools against a real `qzoom serve`, through each framework's own calling
path (a LangChain ToolCall invocation; Qwen-Agent's tool registry and Message/ContentItem types)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from qzoom_client import QZoomClient
from qzoom_client.tools import ToolSession, tool_definition

from ..helpers import make_image


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("frameworks") / "photo.png"
    make_image(640, 480, seed=43).save(path)
    return path


def test_langchain_tool_returns_content_blocks_and_the_crop_as_artifact(qzoom_serve, image_path):
    pytest.importorskip("langchain_core")
    from qzoom_client.tools.langchain_tool import langchain_tools

    with QZoomClient(qzoom_serve, timeout=120) as client:
        session = ToolSession(client, "qwen3vl")
        session.add_image(image_path)
        zoom, answer = langchain_tools(session)
        assert zoom.name == "image_zoom_in_tool" and zoom.args == tool_definition("qwen3vl")["parameters"]["properties"]
        assert zoom.response_format == "content_and_artifact"
        msg = zoom.invoke({"type": "tool_call", "id": "c1", "name": zoom.name,
                           "args": {"bbox_2d": [0, 0, 500, 500], "label": "corner", "img_idx": 0}})
        assert msg.tool_call_id == "c1" and msg.status == "success"
        text, image = msg.content
        assert text == {"type": "text", "text": "Zoomed in on image 0; the crop is image 1 (320x240 pixels)."}
        assert image["type"] == "image" and image["mime_type"] == "image/png"
        assert Image.open(io.BytesIO(base64.b64decode(image["base64"]))).size == (320, 240)
        assert msg.artifact["box"]["original"] == [0, 0, 320, 240] and msg.artifact["png"].startswith(b"\x89PNG")
        bad = zoom.invoke({"type": "tool_call", "id": "c2", "name": zoom.name,
                           "args": {"bbox_2d": [0, 0, 500, 500], "label": "x", "img_idx": 9}})
        assert bad.status == "error" and bad.content.startswith("Error: img_idx 9 is out of range")
        # The session went on: the crop is image 1, and zooming into it works.
        inner = zoom.invoke({"type": "tool_call", "id": "c3", "name": zoom.name,
                             "args": {"bbox_2d": [500, 500, 1000, 1000], "label": "inner", "img_idx": 1}})
        assert inner.status == "success" and inner.artifact["box"]["original"] == [160, 120, 320, 240]
        said = answer.invoke({"type": "tool_call", "id": "c4", "name": "answer", "args": {"question": "What colour?"}})
        assert said.status == "success" and said.artifact["route"] in ("direct", "zoom")


def test_qwen_agent_registry_serves_image_zoom_in_tool_through_the_service(qzoom_serve, image_path, tmp_path):
    pytest.importorskip("qwen_agent")
    from qwen_agent.llm.schema import ContentItem, Message
    from qwen_agent.tools.base import TOOL_REGISTRY

    from qzoom_client.tools.qwen_agent_tool import QZoomImageZoomInTool

    assert TOOL_REGISTRY["image_zoom_in_tool"] is QZoomImageZoomInTool
    tool = TOOL_REGISTRY["image_zoom_in_tool"]({"addr": qzoom_serve, "work_dir": str(tmp_path)})
    assert tool.function == {"name": "image_zoom_in_tool", **{k: v for k, v in tool_definition("qwen3vl").items()
                                                              if k != "name"}}
    messages = [Message(role="user", content=[ContentItem(image=str(image_path)), ContentItem(text="Which digit?")])]
    first = tool.call('{"bbox_2d": [500, 500, 1000, 1000], "label": "quarter", "img_idx": 0}', messages=messages)
    crop = first[0].image
    assert Image.open(crop).size == (320, 240) and first[1].text.startswith("Zoomed in on image 0")
    messages.append(Message(role="function", name="image_zoom_in_tool", content=first))
    second = tool.call({"bbox_2d": [0, 0, 500, 500], "label": "digit", "img_idx": 1}, messages=messages)
    assert Image.open(second[0].image).size == (160, 120)
    assert tool.session.images[-1].box == (320, 240, 480, 360)  # inside the first crop, in original pixels
    bad = tool.call({"bbox_2d": [0, 0, 500, 500], "label": "x", "img_idx": 2}, messages=messages)
    assert [c.text for c in bad] == ["Error: img_idx 2 is out of range: the conversation has 2 image(s) (img_idx 0..1)"]
    missing = tool.call({"bbox_2d": [0, 0, 500, 500], "img_idx": 0}, messages=messages)
    assert "'label' is a required property" in missing[0].text

"""`qzoom-mcp` as MCP clients run it: a real subprocess, driven by the MCP SDK's own client over stdio (and
streamable HTTP), against a real `qzoom serve`."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from qzoom_client.tools import tool_definition

from ..helpers import free_port, make_image

pytest.importorskip("mcp")
import anyio  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

QZOOM_MCP = str(Path(sys.executable).parent / "qzoom-mcp")  # the console script, as an MCP host starts it


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mcp") / "photo.png"
    make_image(640, 480, seed=44).save(path)
    return path


def over_stdio(*args: str):
    async def run(body):
        params = StdioServerParameters(command=QZOOM_MCP, args=list(args))
        with open(os.devnull, "w") as errlog:  # the server logs each call on stderr
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    return await body(session)

    return lambda body: anyio.run(run, body)


def test_stdio_lists_the_shared_schemas(qzoom_serve):
    async def body(session):
        return (await session.list_tools()).tools

    tools = {t.name: t for t in over_stdio("--addr", qzoom_serve)(body)}
    assert set(tools) == {"upload_image", "answer", "zoom_region"}
    for name, profile in (("zoom_region", "generic"), ("answer", "answer"), ("upload_image", "upload_image")):
        assert tools[name].input_schema == tool_definition(profile)["parameters"]
        assert tools[name].description == tool_definition(profile)["description"]
    assert tools["zoom_region"].annotations.read_only_hint is True
    assert "crop_id" in tools["zoom_region"].output_schema["required"]


def test_stdio_upload_zoom_nested_zoom_answer_and_errors(qzoom_serve, image_path):
    async def body(session):
        up = await session.call_tool("upload_image", {"path": str(image_path)})
        image_id = up.structured_content["image_id"]
        zoom = await session.call_tool("zoom_region", {"image_id": image_id, "bbox": [500, 500, 1000, 1000],
                                                       "label": "quarter"})
        crop_id = zoom.structured_content["crop_id"]
        inner = await session.call_tool("zoom_region", {"image_id": image_id, "source": crop_id, "coord_space": "norm1",
                                                        "bbox": [0, 0, 0.5, 0.5], "question": "What digit is there?"})
        bad = await session.call_tool("zoom_region", {"image_id": image_id, "bbox": [1, 2, 3]})
        outside = await session.call_tool("zoom_region", {"image_id": image_id, "bbox": [1100, 1100, 1200, 1200]})
        answer = await session.call_tool("answer", {"question": "What colour is the box?"})
        after = await session.call_tool("zoom_region", {"image_id": image_id, "bbox": [0, 0, 250, 250]})
        return up, zoom, inner, bad, outside, answer, after

    up, zoom, inner, bad, outside, answer, after = over_stdio("--addr", qzoom_serve)(body)
    assert not up.is_error and up.structured_content["img_idx"] == 0
    assert (up.structured_content["width"], up.structured_content["height"]) == (640, 480)

    assert not zoom.is_error and [c.type for c in zoom.content] == ["text", "image"]
    image = zoom.content[1]
    assert image.mime_type == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(image.data))).size == (320, 240)
    assert zoom.structured_content["box"]["original"] == [320, 240, 640, 480]
    assert zoom.structured_content["img_idx"] == 1 and zoom.structured_content["label"] == "quarter"

    assert inner.structured_content["box"]["original"] == [320, 240, 480, 360]
    assert inner.structured_content["source_idx"] == 1 and inner.structured_content["answer"] is not None
    assert "Answer about the region:" in inner.content[0].text

    assert bad.is_error and bad.content[0].text.startswith("Error: invalid arguments for zoom_region: bbox:")
    assert outside.is_error and "lies outside the 640x480 image" in outside.content[0].text
    assert not answer.is_error and answer.structured_content["route"] in ("direct", "zoom")
    assert not after.is_error and after.structured_content["img_idx"] == 3  # errors added no image


def test_stdio_profile_names_the_zoom_tool_and_counts_images(qzoom_serve, image_path):
    data = base64.b64encode(image_path.read_bytes()).decode()

    async def body(session):
        names = [t.name for t in (await session.list_tools()).tools]
        await session.call_tool("upload_image", {"data": data})
        quarter = {"bbox_2d": [0, 0, 500, 500], "label": "q"}
        first = await session.call_tool("image_zoom_in_tool", {**quarter, "img_idx": 0})
        second = await session.call_tool("image_zoom_in_tool", {**quarter, "img_idx": 1})
        missing = await session.call_tool("upload_image", {})
        return names, first, second, missing

    names, first, second, missing = over_stdio("--addr", qzoom_serve, "--profile", "qwen3vl")(body)
    assert names == ["upload_image", "answer", "image_zoom_in_tool"]
    assert first.content[0].text == "Zoomed in on image 0; the crop is image 1 (320x240 pixels)."
    assert second.structured_content["box"]["original"] == [0, 0, 160, 120]
    assert missing.is_error and "exactly one of path" in missing.content[0].text


def test_streamable_http_transport(qzoom_serve, image_path):
    port = free_port()
    proc = subprocess.Popen([QZOOM_MCP, "--addr", qzoom_serve, "--transport", "http", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "qzoom-mcp --transport http did not listen"
            time.sleep(0.2)

        async def run():
            async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    up = await session.call_tool("upload_image", {"path": str(image_path)})
                    return await session.call_tool("zoom_region", {"image_id": up.structured_content["image_id"],
                                                                   "bbox": [0, 0, 500, 500]})

        zoom = anyio.run(run)
        assert not zoom.is_error and zoom.structured_content["box"]["original"] == [0, 0, 320, 240]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

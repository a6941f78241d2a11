"""An MCP server (python `mcp` SDK, MCPServer — FastMCP's name since mcp 2) over stdio or streamable HTTP.

    qzoom-mcp --addr HOST:PORT [--transport stdio|http] [--profile NAME] [--host H --port P]

Tools: `upload_image`, `answer`, and the zoom tool of the chosen profile (`zoom_region` for the
default generic profile; `image_zoom_in_tool` / `crop_image_normalized` / `grounding` for the others),
with the same JSON Schemas as every other integration. Results carry a text block (always: some MCP
clients drop images), the crop as an image block, and `structuredContent` per an `outputSchema`.
Tool failures come back as `isError` results whose text the model can read. The image list (a
ToolSession) is per MCP session: one per stdio process, one per `Mcp-Session-Id` over HTTP; stateless
HTTP clients, which send no session id, share one.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
from collections import OrderedDict

from ..client import QZoomClient
from .errors import ToolError, require
from .profiles import PROFILES, tool_definition, validate_arguments
from .session import ToolResult, ToolSession

anyio = require("anyio", "mcp")
mcpserver = require("mcp.server.mcpserver", "mcp")
types = require("mcp.types", "mcp")

__all__ = ["build_server", "main"]

_MAX_SESSIONS = 256  # HTTP sessions whose image lists are kept, least recently used dropped first
_BOX = {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}
_ZOOM_OUTPUT = {
    "type": "object",
    "properties": {
        "crop_id": {"type": "string"}, "image_id": {"type": "string"},
        "img_idx": {"type": "integer", "description": "this crop's index in the conversation's images"},
        "source_idx": {"type": "integer", "description": "index of the image the box was relative to"},
        "box": {"type": "object", "description": "the box cropped, relative to the original image",
                "properties": {s: _BOX for s in ("original", "input", "norm1000", "norm1")}},
        "width": {"type": "integer"}, "height": {"type": "integer"}, "label": {"type": "string"},
        "answer": {"type": ["string", "null"]},
    },
    "required": ["crop_id", "image_id", "img_idx", "box", "width", "height"],
}
_UPLOAD_OUTPUT = {
    "type": "object",
    "properties": {"image_id": {"type": "string"}, "img_idx": {"type": "integer"}, "width": {"type": "integer"},
                   "height": {"type": "integer"}},
    "required": ["image_id", "img_idx", "width", "height"],
}
_ANSWER_OUTPUT = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "route": {"type": "string"},
                   "gate_score": {"type": ["number", "null"]}, "roi_box": {"anyOf": [_BOX, {"type": "null"}]},
                   "image_id": {"type": "string"}},
    "required": ["answer", "route", "image_id"],
}


class _QZoomMCP(mcpserver.MCPServer):
    """MCPServer whose tools are defined by the shared JSON Schemas rather than Python signatures."""

    def __init__(self, addr: str, profile: str, api_key: str | None):
        super().__init__(name="qzoom", instructions="Zoom into images at full resolution through qzoom-service: "
                         "upload_image first, then zoom by the returned image_id (or image index).")
        self.addr, self.profile, self.api_key = addr, profile, api_key
        self._sessions: OrderedDict[str, ToolSession] = OrderedDict()
        self._tools = {
            "upload_image": (tool_definition("upload_image"), _UPLOAD_OUTPUT, self._upload),
            "answer": (tool_definition("answer"), _ANSWER_OUTPUT, self._answer),
            tool_definition(profile)["name"]: (tool_definition(profile), _ZOOM_OUTPUT, self._zoom),
        }

    async def list_tools(self):
        return [types.Tool(name=d["name"], description=d["description"], input_schema=d["parameters"],
                           output_schema=out, annotations=types.ToolAnnotations(read_only_hint=name != "upload_image"))
                for name, (d, out, _) in self._tools.items()]

    async def call_tool(self, name, arguments, context=None):
        if name not in self._tools:
            return _error(ToolError(f"unknown tool {name!r}; the tools are {', '.join(self._tools)}"))
        session = self._session(context)
        run = self._tools[name][2]
        try:
            return await anyio.to_thread.run_sync(run, session, arguments or {})
        except ToolError as e:
            return _error(e)

    def _session(self, context) -> ToolSession:
        headers = (context.headers if context is not None else None) or {}
        key = headers.get("mcp-session-id", "")  # stdio and stateless HTTP: ""
        if key not in self._sessions:
            self._sessions[key] = ToolSession(QZoomClient(self.addr, api_key=self.api_key), self.profile)
            while len(self._sessions) > _MAX_SESSIONS:
                self._sessions.popitem(last=False)[1].client.close()
        self._sessions.move_to_end(key)
        return self._sessions[key]

    # -- tools (run in a worker thread: the gRPC client blocks) ------------------------------------

    @staticmethod
    def _upload(session: ToolSession, arguments: dict):
        validate_arguments("upload_image", arguments)
        obs = session.add_image(_image_bytes(arguments))
        data = {"image_id": obs.image_id, "img_idx": obs.index, "width": obs.width, "height": obs.height}
        text = f"Uploaded image {obs.index}: image_id {obs.image_id}, {obs.width}x{obs.height} pixels."
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)], structured_content=data)

    @staticmethod
    def _answer(session: ToolSession, arguments: dict):
        return _result(session.call("answer", arguments))

    def _zoom(self, session: ToolSession, arguments: dict):
        return _result(session.call(tool_definition(self.profile)["name"], arguments))


def _image_bytes(arguments: dict) -> bytes:
    path, data = arguments.get("path"), arguments.get("data")
    if bool(path) == bool(data):
        raise ToolError("give exactly one of path (a file on the tool server's machine) or data (base64)")
    if path:
        if not os.path.isfile(path):
            raise ToolError(f"no image file at {path!r} on the tool server's machine; send data (base64) instead")
        with open(path, "rb") as f:
            return f.read()
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ToolError("data is not valid base64") from None


def _result(result: ToolResult):
    content = [types.TextContent(type="text", text=result.text)]
    if result.png is not None:
        content.append(types.ImageContent(type="image", data=base64.b64encode(result.png).decode(),
                                          mime_type="image/png"))
    return types.CallToolResult(content=content, structured_content=result.data)


def _error(error: ToolError):
    return types.CallToolResult(content=[types.TextContent(type="text", text=error.text)], is_error=True)


def build_server(addr: str, profile: str = "generic", api_key: str | None = None):
    """The MCP server object (call `.run("stdio")` or `.run("streamable-http", host=..., port=...)`)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown tool profile {profile!r}; use one of {', '.join(PROFILES)}")
    return _QZoomMCP(addr, profile, api_key)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="qzoom-mcp", description="MCP server for qzoom-service's zoom tools")
    ap.add_argument("--addr", required=True, help="HOST:PORT of the qzoom gRPC service")
    ap.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                    help="stdio (default) or streamable HTTP at http://HOST:PORT/mcp")
    ap.add_argument("--profile", choices=PROFILES, default="generic", help="the zoom tool's profile (default generic)")
    ap.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")
    ap.add_argument("--api-key", help="the service's API key (default: $QZOOM_API_KEY)")
    args = ap.parse_args(argv)
    server = build_server(args.addr, args.profile, args.api_key or os.environ.get("QZOOM_API_KEY"))
    if args.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=args.host, port=args.port)


if __name__ == "__main__":
    main()

"""A Qwen-Agent tool registered as `image_zoom_in_tool` (the qwen3vl profile: 0-1000 boxes, `img_idx`).

Importing this module replaces Qwen-Agent's built-in `image_zoom_in_tool` (which crops local files
itself) with one that crops through qzoom-service. A native tool is the way to give Qwen-Agent image
results: its MCP bridge keeps only the text parts of a tool result.

    from qzoom_client.tools import qwen_agent_tool  # noqa: F401  (registers the tool)
    bot = Assistant(llm=..., function_list=[{"name": "image_zoom_in_tool", "addr": "localhost:9000"}])

`img_idx` counts the images of the conversation as Qwen-Agent does (each distinct image once, in order,
earlier crops included); images the service has not seen yet are uploaded on the first call after they
appear. Crops are written as PNG files under the tool's work_dir, since Qwen-Agent passes images by path.
"""

from __future__ import annotations

import base64
import os

from ..client import QZoomClient
from .errors import ToolError, require
from .parsers import parse_arguments
from .profiles import tool_definition
from .session import ToolSession

_base = require("qwen_agent.tools.base", "qwen-agent")
_schema = require("qwen_agent.llm.schema", "qwen-agent")
_utils = require("qwen_agent.utils.utils", "qwen-agent")

__all__ = ["QZoomImageZoomInTool"]


@_base.register_tool("image_zoom_in_tool", allow_overwrite=True)
class QZoomImageZoomInTool(_base.BaseToolWithFileAccess):
    description = tool_definition("qwen3vl")["description"]
    parameters = tool_definition("qwen3vl")["parameters"]

    def __init__(self, cfg: dict | None = None):
        """cfg: `addr` (HOST:PORT, default $QZOOM_ADDR), `api_key` (default $QZOOM_API_KEY), `work_dir`."""
        super().__init__(cfg)
        addr = self.cfg.get("addr") or os.environ.get("QZOOM_ADDR")
        if not addr:
            raise ValueError("image_zoom_in_tool needs the service address: cfg {'addr': 'HOST:PORT'} or $QZOOM_ADDR")
        client = QZoomClient(addr, api_key=self.cfg.get("api_key") or os.environ.get("QZOOM_API_KEY"))
        self.session = ToolSession(client, "qwen3vl")
        self._index: dict[str, int] = {}  # image reference in the messages -> index in the session

    def call(self, params, **kwargs) -> list:
        try:
            arguments = parse_arguments(self.name, params)
            images = self._sync(_utils.extract_images_from_messages(kwargs.get("messages", [])))
            result = self.session.call(self.name, self._in_session(arguments, images))
        except ToolError as e:
            return [_schema.ContentItem(text=e.text)]
        path = self._save(result)
        return [_schema.ContentItem(image=path), _schema.ContentItem(text=result.text)]

    def _sync(self, images: list[str]) -> list[str]:
        """Upload the images of the messages the session does not know yet (crops it made are known)."""
        for ref in images:
            if ref not in self._index:
                self._index[ref] = self.session.add_image(_read(ref)).index
        return images

    def _in_session(self, arguments: dict, images: list[str]) -> dict:
        """img_idx over the messages' images -> the same image's index in the session."""
        idx = arguments.get("img_idx") if isinstance(arguments, dict) else None
        if isinstance(idx, bool) or not isinstance(idx, (int, float)) or idx != int(idx):
            return arguments  # missing or mistyped: the schema check words the error
        if not 0 <= idx < len(images):
            raise ToolError(f"img_idx {idx} is out of range: the conversation has {len(images)} image(s)"
                            + (f" (img_idx 0..{len(images) - 1})" if images else ""))
        return {**arguments, "img_idx": self._index[images[int(idx)]]}

    def _save(self, result) -> str:
        os.makedirs(self.work_dir, exist_ok=True)
        path = os.path.abspath(os.path.join(self.work_dir, f"{result.data['crop_id']}-{result.observation.index}.png"))
        with open(path, "wb") as f:
            f.write(result.png)
        self._index[path] = result.observation.index
        return path


def _read(ref: str) -> bytes:
    """A Qwen-Agent image reference (a path, file:// URL or data URL) -> the image bytes."""
    if ref.startswith("data:"):
        return base64.b64decode(ref.split(",", 1)[1])
    path = ref[len("file://"):] if ref.startswith("file://") else ref
    if not os.path.isfile(path):
        raise ToolError(f"cannot read image {ref!r}: give a local path or a data URL")
    with open(path, "rb") as f:
        return f.read()

"""LangChain tools (langchain-core): the profile's zoom tool and `answer`, bound to a ToolSession.

`response_format="content_and_artifact"`: the model gets content blocks (the text, then the crop as a
standard `image` block); the artifact keeps the PNG bytes and the structured result for the program.
A ToolError becomes the tool message's text (`handle_tool_error`), so the agent can correct the call.
"""

from __future__ import annotations

import base64

from .errors import ToolError, require
from .session import ToolSession

_tools = require("langchain_core.tools", "langchain")

__all__ = ["zoom_tool", "answer_tool", "langchain_tools"]


def _structured_tool(session: ToolSession, definition: dict):
    name = definition["name"]

    def run(**arguments):
        try:
            result = session.call(name, arguments)
        except ToolError as e:
            raise _tools.ToolException(e.text) from None
        content = [{"type": "text", "text": result.text}]
        if result.png is not None:
            content.append({"type": "image", "base64": base64.b64encode(result.png).decode(), "mime_type": "image/png"})
        return content, {"png": result.png, **result.data}

    return _tools.StructuredTool.from_function(
        func=run, name=name, description=definition["description"], args_schema=definition["parameters"],
        response_format="content_and_artifact", handle_tool_error=True)


def zoom_tool(session: ToolSession):
    """The session profile's zoom tool as a `StructuredTool`."""
    return _structured_tool(session, session.tool_definitions(answer=False)[0])


def answer_tool(session: ToolSession):
    """The service's own coarse -> gate -> zoom answer, as a `StructuredTool`."""
    return _structured_tool(session, session.tool_definitions()[1])


def langchain_tools(session: ToolSession, answer: bool = True) -> list:
    return [zoom_tool(session)] + ([answer_tool(session)] if answer else [])

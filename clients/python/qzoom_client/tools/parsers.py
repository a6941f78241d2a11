"""Tool calls written as text: Qwen/hermes `<tool_call>{...}</tool_call>` and Mini-o3 `<grounding>{...}</grounding>`.

Serving stacks usually stop generation at the closing tag and drop it (vLLM's stop strings, Mini-o3's
rollout), so a final block without its closing tag is accepted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .errors import ToolError

__all__ = ["ToolCall", "parse_tool_calls", "parse_grounding", "parse_arguments"]

_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_GROUNDING = re.compile(r"<grounding>(.*?)(?:</grounding>|\Z)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


def _json_object(raw: str, tag: str, example: str) -> dict:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ToolError(f"the <{tag}> block is not valid JSON ({e.msg} at character {e.pos}); "
                        f"write it as <{tag}>{example}</{tag}>") from None
    if not isinstance(value, dict):
        raise ToolError(f"the <{tag}> block must hold a JSON object; write it as <{tag}>{example}</{tag}>")
    return value


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in a model's turn, in order."""
    example = '{"name": "<tool>", "arguments": {...}}'
    calls = []
    for raw in _TOOL_CALL.findall(text):
        value = _json_object(raw.strip(), "tool_call", example)
        name, arguments = value.get("name"), value.get("arguments", {})
        if isinstance(arguments, str):  # some models encode the arguments twice
            arguments = _json_object(arguments, "tool_call", example)
        if not isinstance(name, str) or not name:
            raise ToolError(f"a <tool_call> needs a \"name\"; write it as <tool_call>{example}</tool_call>")
        calls.append(ToolCall(name, arguments))
    return calls


def parse_grounding(text: str) -> list[ToolCall]:
    """Every Mini-o3 `<grounding>{"bbox_2d": [...], "source": ...}</grounding>`, as calls named `grounding`."""
    example = '{"bbox_2d": [x1, y1, x2, y2], "source": "original_image"}'
    return [ToolCall("grounding", _json_object(raw.strip(), "grounding", example)) for raw in _GROUNDING.findall(text)]


def parse_arguments(name: str, arguments) -> dict:
    """Function-calling arguments as a dict: OpenAI-style APIs deliver them as JSON text."""
    if isinstance(arguments, (str, bytes)):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            raise ToolError(f"the arguments of {name} are not valid JSON ({e.msg} at character {e.pos})") from None
    return arguments

"""OpenAI-style function calling, as plain dicts (no `openai` package needed).

Tool definitions come in both shapes: Chat Completions nests {"type": "function", "function": {...}},
the Responses API is flat. Results go back differently:

- Responses: a `function_call_output` item whose `output` holds an `input_text` and the crop as an
  `input_image` data URL (the Responses API accepts images in tool output).
- Chat Completions: `tool` messages carry text only (OpenAI types them as text; vLLM rejects images
  there), so each assistant turn's tool messages are followed by one `user` message with the crops,
  the pattern vLLM-served Qwen models and the DeepEyes / Chain-of-Focus evaluation loops use.
"""

from __future__ import annotations

from .errors import ToolError
from .profiles import tool_definition
from .session import ToolResult, ToolSession

__all__ = ["chat_tools", "responses_tools", "run_responses_call", "run_chat_tool_calls"]


def _definitions(profile: str, answer: bool) -> list[dict]:
    return [tool_definition(profile)] + ([tool_definition("answer")] if answer else [])


def chat_tools(profile: str = "generic", answer: bool = True) -> list[dict]:
    """`tools=` for Chat Completions (and vLLM's OpenAI-compatible server)."""
    return [{"type": "function", "function": d} for d in _definitions(profile, answer)]


def responses_tools(profile: str = "generic", answer: bool = True) -> list[dict]:
    """`tools=` for the Responses API. Not strict: the schemas have optional keys."""
    return [{"type": "function", **d, "strict": False} for d in _definitions(profile, answer)]


def _get(obj, key: str):
    """Dicts or SDK objects (which expose the same names as attributes)."""
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _run(session: ToolSession, name: str, arguments) -> ToolResult | ToolError:
    try:
        return session.call(name, arguments)
    except ToolError as e:
        return e


def run_responses_call(session: ToolSession, item) -> dict:
    """A Responses `function_call` item -> its `function_call_output` item (append it to `input`)."""
    outcome = _run(session, _get(item, "name"), _get(item, "arguments"))
    output: str | list = outcome.text
    if isinstance(outcome, ToolResult) and outcome.png is not None:
        output = [{"type": "input_text", "text": outcome.text},
                  {"type": "input_image", "image_url": outcome.data_url()}]
    return {"type": "function_call_output", "call_id": _get(item, "call_id"), "output": output}


def run_chat_tool_calls(session: ToolSession, message) -> list[dict]:
    """An assistant message with `tool_calls` -> the messages to append: one `tool` message per call
    (text), then one `user` message carrying every crop of the turn (absent when no crop came back)."""
    tool_messages, images = [], []
    for call in _get(message, "tool_calls") or []:
        function = _get(call, "function")
        outcome = _run(session, _get(function, "name"), _get(function, "arguments"))
        tool_messages.append({"role": "tool", "tool_call_id": _get(call, "id"), "content": outcome.text})
        if isinstance(outcome, ToolResult) and outcome.png is not None:
            images += [{"type": "text", "text": f"Crop from tool call {_get(call, 'id')}:"},
                       {"type": "image_url", "image_url": {"url": outcome.data_url()}}]
    return tool_messages + ([{"role": "user", "content": images}] if images else [])

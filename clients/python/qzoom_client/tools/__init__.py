"""Zoom tools for thinking-with-images agents, on top of qzoom-client.

Core (no extra dependencies beyond jsonschema): tool profiles with their JSON Schemas, the text
parsers, `ToolSession`, and the OpenAI tool shapes (`openai_tools`). Integrations that need a
framework are separate modules imported on demand: `mcp_server` (extra `mcp`), `langchain_tool`
(extra `langchain`), `qwen_agent_tool` (extra `qwen-agent`).
"""

from .errors import ToolError
from .parsers import ToolCall, parse_arguments, parse_grounding, parse_tool_calls
from .profiles import PROFILES, Observation, Target, plan_zoom, resolve, tool_definition, validate_arguments
from .session import ToolResult, ToolSession

__all__ = ["ToolSession", "ToolResult", "ToolError", "ToolCall", "Observation", "Target", "PROFILES",
           "tool_definition", "validate_arguments", "resolve", "plan_zoom", "parse_tool_calls", "parse_grounding",
           "parse_arguments"]

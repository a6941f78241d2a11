"""ToolError: what a tool call that cannot be served turns into, as text a model can read and act on."""

from __future__ import annotations

import importlib

__all__ = ["ToolError", "require"]


class ToolError(Exception):
    """A tool call failed. `text` goes back to the model; `code` is a gRPC status name for programs.

    The session that raised it is unchanged: the conversation can go on with a corrected call.
    """

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.message, self.code = message, code

    @property
    def text(self) -> str:
        return f"Error: {self.message}"


def require(module: str, extra: str):
    """Import an integration's dependency, or fail with the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this integration needs {module.split('.')[0]}: pip install 'qzoom-client[{extra}]'") from e

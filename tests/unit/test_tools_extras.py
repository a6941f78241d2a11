"""Integrations are optional extras: the core tools import none of them, and a missing one fails with the
pip extra that installs it."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

INTEGRATIONS = [("qzoom_client.tools.mcp_server", "mcp", "mcp"),
                ("qzoom_client.tools.langchain_tool", "langchain_core", "langchain"),
                ("qzoom_client.tools.qwen_agent_tool", "qwen_agent", "qwen-agent")]


def test_the_core_tools_import_no_framework():
    code = ("import sys, qzoom_client.tools, qzoom_client.tools.openai_tools; "
            "print([m for m in ('mcp', 'langchain_core', 'qwen_agent', 'openai') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module,dependency,extra", INTEGRATIONS)
def test_a_missing_extra_names_the_pip_command(monkeypatch, module, dependency, extra):
    for name in [m for m in sys.modules if m == dependency or m.startswith(dependency + ".")] + [dependency]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError, even if loaded
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'qzoom-client\[{extra}\]'"):
        importlib.import_module(module)

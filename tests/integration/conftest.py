"""`qzoom serve` (the real command, embedded default model) as a subprocess, shared by the agent-tool and
MCP tests: started on first use, stopped at the end of the session."""

from __future__ import annotations

import pytest

from ..helpers import qzoom_serve as run_qzoom_serve


@pytest.fixture(scope="session")
def qzoom_serve(tmp_path_factory) -> str:
    """The gRPC address (host:port) of a running `qzoom serve`."""
    with run_qzoom_serve(tmp_path_factory.mktemp("qzoom-serve") / "serve.log") as addr:
        yield addr

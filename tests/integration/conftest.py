"""`qzoom serve` (the real command, embedded default model) as a subprocess, shared by the agent-tool and
MCP tests: started on first use, stopped at the end of the session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def qzoom_serve(tmp_path_factory) -> str:
    """The gRPC address (host:port) of a running `qzoom serve`."""
    grpc_port, http_port = _free_port(), _free_port()
    log = tmp_path_factory.mktemp("qzoom-serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "qzoom_service.cli", "serve", "--grpc-port", str(grpc_port),
                                 "--http-port", str(http_port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "qzoom serving gRPC on" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"qzoom serve did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"127.0.0.1:{grpc_port}"
    finally:
        # SIGTERM to `qzoom serve` alone lets it shut Serve and its own Ray cluster down in order; then the
        # process group (Ray's daemons) goes. No machine-wide `ray stop`: other Ray clusters may be running.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

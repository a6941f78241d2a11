"""Deterministic test inputs, and `qzoom serve` as a subprocess."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qzoom_service.tiny import TinySpec

# The tiny models' own image-processor budget (64..144 merged tokens).
TINY_BUDGET = dict(min_pixels=TinySpec.min_pixels, max_pixels=TinySpec.max_pixels)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 3, height // 3, width // 2, height // 2], fill=(255, 0, 0))
    return img


def png(image: Image.Image) -> bytes:
    """The image encoded as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(argv: list[str], log, ready: str, *, timeout: float, env: dict | None = None, stop_wait: float = 60):
    """Run `argv` in its own process group with its output in `log`; yield the process once `ready` appears
    in the log. Afterwards SIGTERM the leader (an orderly shutdown), then SIGKILL what is left of the group.
    No machine-wide `ray stop`: other Ray clusters may be running."""
    import pytest

    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while ready not in Path(log).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{argv[2:4]} did not become ready:\n{Path(log).read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=stop_wait)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def qzoom_serve(log, *args: str, timeout: float = 240, env: dict | None = None, stop_wait: float = 60):
    """Run the real `qzoom serve` (embedded default unless `args` say otherwise) with its output in `log`;
    yield its gRPC address once it says it is serving, stop it afterwards (SIGKILL after `stop_wait` s).
    `env`: extra environment variables (`RAY_ADDRESS` joins an existing Ray cluster instead of starting one)."""
    grpc_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "qzoom_service.cli", "serve", "--grpc-port", str(grpc_port),
            "--http-port", str(http_port), *args]
    with running(argv, log, "qzoom serving gRPC on", timeout=timeout, env=env, stop_wait=stop_wait):
        yield f"127.0.0.1:{grpc_port}"

"""What `grpc.health.v1.Health` reports for one replica: SERVING while its model can serve, NOT_SERVING
after a fatal error.

A replica exists only once its model is loaded: the deployment's constructor loads it and Ray routes no
call to a replica before the constructor returns, so a state starts SERVING. While no replica is up yet
(the app deploying, the model loading) nothing of ours can answer; what a probe sees then is the proxy's
answer (docs/operations.md, "Health"). A fatal error is one after which this process cannot serve again:
a CUDA error (`torch.AcceleratorError`, sticky: every later kernel fails too). The state turns
NOT_SERVING and stays so; the deployment's `check_health` then raises and Ray replaces the replica.
"""

from __future__ import annotations

import asyncio
import sys
from typing import AsyncIterator

from grpc_health.v1 import health_pb2

__all__ = ["SERVICES", "HealthState", "is_fatal"]

# The names a health check may ask about: the server as a whole ("") and our one service.
SERVICES = ("", "qzoom.v1.QZoomService")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


def is_fatal(exc: BaseException) -> bool:
    """Whether `exc` leaves the process unable to serve (the accelerator's context is broken)."""
    torch = sys.modules.get("torch")  # not imported here: without torch loaded there is no CUDA error
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return accelerator_error is not None and isinstance(exc, accelerator_error)


class HealthState:
    """`poll_s`: how often `changes` looks at the state (a Watch stream's reaction time)."""

    def __init__(self, poll_s: float = 1.0):
        self.fatal: str | None = None  # why this replica stopped serving
        self.poll_s = poll_s

    @property
    def serving(self) -> bool:
        return self.fatal is None

    def note_failure(self, exc: BaseException) -> None:
        """Called with every unexpected error; only a fatal one changes the state."""
        if self.fatal is None and is_fatal(exc):
            self.fatal = f"{type(exc).__name__}: {exc}"[:500]

    def status(self, service: str) -> int | None:
        """The `ServingStatus` of `service`, or None when it is not one of ours (NOT_FOUND for Check)."""
        if service not in SERVICES:
            return None
        return SERVING if self.serving else NOT_SERVING

    async def changes(self, service: str) -> AsyncIterator[int]:
        """The status now, then each time it changes; never ends by itself (the caller or a deadline does)."""
        last = None
        while True:
            status = self.status(service)
            status = SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield status
                last = status
            await asyncio.sleep(self.poll_s)

"""The session's `qzoom serve` (tests/serving.py) as the agent-tool and MCP tests use it, and the shared Redis."""

from __future__ import annotations

import pytest

REDIS_URL = "redis://127.0.0.1:6379/15"  # DB 15: kept apart from anything a developer runs on DB 0


def redis_reachable(url: str) -> bool:
    """Whether a Redis server answers PING at `url`. redis-py's `ping()` raises when none does (it never
    returns False), so the errors are the answer."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def qzoom_serve(qzoom_service) -> str:
    """The gRPC address (host:port) of a running `qzoom serve`, embedded default model."""
    return qzoom_service.address

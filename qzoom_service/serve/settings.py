"""The application's arguments (`args:` of the Ray Serve config), one typed object with validation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..config import EngineConfig
from ..errors import InvalidInput

__all__ = ["AppSettings", "build_engine", "grpc_message_limit", "GRPC_MESSAGE_LIMIT_ENV", "APP_NAME", "IMPORT_PATH", "SERVICER_FUNCTION", "HEALTH_SERVICER_FUNCTION"]

# What a Serve config names (here, not in app.py, so `qzoom serve` reads them without importing Ray).
APP_NAME = "qzoom"
IMPORT_PATH = "qzoom_service.serve.app:build_app"
SERVICER_FUNCTION = "qzoom_client._proto.qzoom.v1.qzoom_pb2_grpc.add_QZoomServiceServicer_to_server"
# grpc.health.v1.Health, what Kubernetes' gRPC probes and grpc_health_probe call (answered by CoarseGate).
HEALTH_SERVICER_FUNCTION = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
# Ray 2.60's gRPC proxy takes its message limit (default 2 GiB) only from this variable, read when the proxy
# process starts: it has to be in the environment of every Ray node (`qzoom serve`, the chart's pods).
GRPC_MESSAGE_LIMIT_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
# Room for a request's other fields: the question and suffix are bounded in tokens, far below this.
_GRPC_FRAMING_BYTES = 1 << 20


@dataclass(frozen=True)
class AppSettings:
    """The service's own settings plus the engine's (`engine`); per-deployment resources live in the Serve config.

    `args:` may give EngineConfig fields flat (`model: ...`, `device: cuda`, `max_batch_size: 8`) or under
    `engine:`; both end up in `engine`. `max_batch_size` (the engine's) also bounds the coarse pass's
    dynamic batches.
    """

    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    redis_url: str | None = None  # None or memory:// = in-process cache per replica
    # Name of an environment variable holding the Redis URL, read in each replica and preferred over
    # redis_url when set: keeps a password out of the Serve config (the Helm chart fills it from a Secret).
    redis_url_env: str | None = None
    cache_ttl_s: int = 86400
    cache_max_bytes: int = 512 << 20  # in-process cache only; bound Redis with its own maxmemory
    cache_prefix: str = "qzoom:"
    api_keys_env: str = "QZOOM_API_KEYS"  # env var with comma-separated keys; unset/empty = auth off
    # How long a dynamic batch that is not full waits for company (0: it runs when the replica is free).
    batch_wait_timeout_s: float = 0.0
    max_crops_per_image: int = 64
    max_batch_visual_tokens: int = 8192  # a dynamic batch's summed coarse visual tokens (a larger image runs alone)

    @classmethod
    def from_dict(cls, args: dict | None) -> "AppSettings":
        """Validate `args` (unknown keys and bad values raise `InvalidInput` naming them)."""
        args = dict(args or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"engine"}
        engine_names = {f.name for f in dataclasses.fields(EngineConfig)} - {"extra"}
        engine = args.pop("engine", None) or {}
        if not isinstance(engine, dict):
            raise InvalidInput(f"qzoom app arg 'engine' must be a mapping of engine settings; got {engine!r}")
        engine = dict(engine)
        for key in list(args):
            if key not in names and key in engine_names:
                engine[key] = args.pop(key)
        unknown = sorted(set(args) - names)
        if unknown:
            raise InvalidInput(f"unknown qzoom app args: {', '.join(unknown)}; known: "
                               f"{', '.join(sorted(names | engine_names))}")
        settings = cls(**args, engine=EngineConfig.from_dict(engine))
        if settings.batch_wait_timeout_s < 0:
            raise InvalidInput(f"batch_wait_timeout_s must be >= 0; got {settings.batch_wait_timeout_s}")
        if settings.max_batch_visual_tokens < 1:
            raise InvalidInput(f"max_batch_visual_tokens must be >= 1; got {settings.max_batch_visual_tokens}")
        return settings

    def api_keys(self) -> frozenset[str]:
        raw = os.environ.get(self.api_keys_env, "") if self.api_keys_env else ""
        return frozenset(k.strip() for k in raw.split(",") if k.strip())

    def to_dict(self) -> dict:
        """What `from_dict` reads back (sent to every replica)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "engine"}
        return {**out, "engine": self.engine.to_dict()}


def grpc_message_limit(engine: EngineConfig) -> int:
    """Largest gRPC message worth receiving: the largest accepted image plus framing; larger ones are refused
    by the proxy (RESOURCE_EXHAUSTED) before they are buffered whole."""
    return engine.max_image_bytes + _GRPC_FRAMING_BYTES


def build_engine(settings: AppSettings):
    """Load the model and open the cache named by the settings (in a replica, never in the controller)."""
    from ..cache import make_cache
    from ..engine import QZoomEngine
    from ..model import load_for_config

    config = settings.engine
    url = (os.environ.get(settings.redis_url_env) if settings.redis_url_env else None) or settings.redis_url
    url = url or "memory://"
    if url == "memory://":
        cache = make_cache(url, max_bytes=settings.cache_max_bytes, ttl_s=settings.cache_ttl_s)
    else:
        cache = make_cache(url, prefix=settings.cache_prefix, ttl_s=settings.cache_ttl_s)
    return QZoomEngine(load_for_config(config), config, feature_cache=cache), cache

"""The application's arguments (`args:` of the Ray Serve config), one typed object with validation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..config import EngineConfig
from ..errors import InvalidInput

__all__ = ["AppSettings", "build_engine"]


@dataclass(frozen=True)
class AppSettings:
    """Everything `build_app` needs besides per-deployment resources (those live in the Serve config)."""

    model: str | None = None  # checkpoint dir or hub id; None = the embedded default
    device: str = "cpu"
    dtype: str = "float32"
    redis_url: str | None = None  # None or memory:// = in-process cache per replica
    # Name of an environment variable holding the Redis URL, read in each replica and preferred over
    # redis_url when set: keeps a password out of the Serve config (the Helm chart fills it from a Secret).
    redis_url_env: str | None = None
    cache_ttl_s: int = 86400
    cache_max_bytes: int = 512 << 20  # in-process cache only; bound Redis with its own maxmemory
    cache_prefix: str = "qzoom:"
    api_keys_env: str = "QZOOM_API_KEYS"  # env var with comma-separated keys; unset/empty = auth off
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    max_crops_per_image: int = 64
    engine: dict = dataclasses.field(default_factory=dict)  # further EngineConfig fields

    @classmethod
    def from_dict(cls, args: dict | None) -> "AppSettings":
        args = dict(args or {})
        names = {f.name for f in dataclasses.fields(cls)}
        engine_names = {f.name for f in dataclasses.fields(EngineConfig)} - {"extra"}
        engine = dict(args.pop("engine", {}) or {})
        # EngineConfig fields may also be given flat (e.g. `max_new_tokens: 32`).
        for key in list(args):
            if key not in names and key in engine_names:
                engine[key] = args.pop(key)
        unknown = sorted(set(args) - names)
        if unknown:
            raise InvalidInput(f"unknown qzoom app args: {', '.join(unknown)}")
        settings = cls(**args, engine=engine)
        settings.engine_config()  # validate early, in the controller, not in every replica
        if settings.max_batch_size < 1 or settings.batch_wait_timeout_s < 0:
            raise InvalidInput("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        return settings

    def engine_config(self) -> EngineConfig:
        return EngineConfig.from_dict(
            {"model": self.model, "device": self.device, "dtype": self.dtype,
             "max_batch_size": max(self.max_batch_size, EngineConfig.max_batch_size), **self.engine}
        )

    def api_keys(self) -> frozenset[str]:
        raw = os.environ.get(self.api_keys_env, "") if self.api_keys_env else ""
        return frozenset(k.strip() for k in raw.split(",") if k.strip())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_engine(settings: AppSettings):
    """Load the model and open the cache named by the settings (in a replica, never in the controller)."""
    from ..cache import make_cache
    from ..engine import QZoomEngine
    from ..model import load_for_config

    config = settings.engine_config()
    url = (os.environ.get(settings.redis_url_env) if settings.redis_url_env else None) or settings.redis_url
    url = url or "memory://"
    if url == "memory://":
        cache = make_cache(url, max_bytes=settings.cache_max_bytes, ttl_s=settings.cache_ttl_s)
    else:
        cache = make_cache(url, prefix=settings.cache_prefix, ttl_s=settings.cache_ttl_s)
    return QZoomEngine(load_for_config(config), config, feature_cache=cache), cache

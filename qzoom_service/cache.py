"""Image and coarse-feature cache: an in-process LRU or Redis, behind one small interface.

What is cached: the original image bytes under their sha256 (`UploadImage` handles), the coarse view's
merged visual embeddings and patch grid (the vision tower's output, so a repeated question or a
`ZoomRegion` on a known image skips the encoder), small auxiliary records (crop handles as JSON) and
capped counters (the per-image crop quota), counted atomically.

Boundaries:
- A cache is never on the request's critical path for correctness: every failure (Redis down, slow,
  full, a corrupt value) is logged, counted and turned into a miss or a no-op. Callers recompute.
- Values cross process boundaries only as bytes: features as one safetensors blob (no pickle, so a
  shared store cannot execute code in the server), images and blobs as given.
- Keys carry everything that changes the features (model id and revision, pixel budget, dtype), so
  two deployments of different models can share one Redis.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from safetensors.torch import load as _st_load, save as _st_save

__all__ = ["FeatureKey", "CoarseFeatures", "FeatureCache", "InProcessCache", "RedisCache", "make_cache"]

log = logging.getLogger(__name__)

_SCHEMA = "qzoom.coarse.v1"
_SAFE_PART = re.compile(r"[A-Za-z0-9._/+-]{1,128}")


def _key_part(value: str) -> str:
    # ':' and '@' delimit key fields; anything else odd (spaces, very long paths) is hashed so that the
    # key stays unambiguous and bounded. The '~' marks a hashed part.
    if _SAFE_PART.fullmatch(value):
        return value
    return "~" + hashlib.sha256(value.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class FeatureKey:
    """Everything that determines a coarse view's visual features."""

    image_id: str  # sha256 hex of the original image bytes
    model_id: str  # hub id or checkpoint path
    model_revision: str  # commit hash or weights digest; changes invalidate old entries
    min_pixels: int  # coarse pixel budget of the smart resize, pixels of the model input
    max_pixels: int
    dtype: str  # dtype the vision tower ran in, e.g. "bfloat16"

    def as_str(self, prefix: str = "") -> str:
        """A stable key, e.g. `qzoom:feat:v1:Qwen/Qwen2.5-VL-7B-Instruct@abc123:200704-451584:bfloat16:<sha256>`."""
        model = f"{_key_part(self.model_id)}@{_key_part(self.model_revision)}"
        budget = f"{int(self.min_pixels)}-{int(self.max_pixels)}"
        return f"{prefix}feat:v1:{model}:{budget}:{_key_part(self.dtype)}:{_key_part(self.image_id)}"


@dataclass
class CoarseFeatures:
    """The coarse view's vision-tower output. Serialised with safetensors only (never pickle)."""

    embeds: torch.Tensor  # (Nv, D) merged visual embeddings, any float dtype
    grid_thw: torch.Tensor  # (1, 3) long, patch grid (t, h, w) of the coarse image

    @property
    def nbytes(self) -> int:
        return self.embeds.nbytes + self.grid_thw.nbytes

    def to_bytes(self) -> bytes:
        # safetensors needs contiguous CPU tensors; names match vLLM's image_embeds / image_grid_thw inputs.
        tensors = {
            "image_embeds": self.embeds.detach().to("cpu").contiguous(),
            "image_grid_thw": self.grid_thw.detach().to("cpu", torch.int64).contiguous(),
        }
        return _st_save(tensors, metadata={"schema": _SCHEMA})

    @classmethod
    def from_bytes(cls, data: bytes) -> CoarseFeatures:
        """Parse `to_bytes` output; raises ValueError on anything else (the caches treat that as a miss)."""
        try:
            tensors = _st_load(data)
        except Exception as exc:  # safetensors raises its own error types on truncated or foreign data
            raise ValueError(f"not a safetensors blob: {exc}") from exc
        embeds, grid = tensors.get("image_embeds"), tensors.get("image_grid_thw")
        if embeds is None or grid is None or embeds.dim() != 2 or tuple(grid.shape) != (1, 3):
            raise ValueError(f"unexpected tensors in feature blob: { {k: tuple(v.shape) for k, v in tensors.items()} }")
        return cls(embeds=embeds, grid_thw=grid)


class FeatureCache(Protocol):
    """The interface the engine and the ingress use. Getters return None on a miss or any failure."""

    backend: str

    def put_image(self, image_id: str, data: bytes) -> bool:
        """Store the image once; True when this call stored it (False: already there, or not storable)."""
        ...

    def get_image(self, image_id: str) -> bytes | None: ...
    def put_features(self, key: FeatureKey, features: CoarseFeatures) -> None: ...
    def get_features(self, key: FeatureKey) -> CoarseFeatures | None: ...
    def put_blob(self, key: str, data: bytes) -> None: ...
    def get_blob(self, key: str) -> bytes | None: ...

    def count_within_limit(self, key: str, limit: int) -> bool:
        """Add one to the counter `key` unless it has reached `limit`, in one atomic step; False at the
        limit. Fail-open like every other operation: True when the store cannot count."""
        ...

    def ping(self) -> bool: ...
    def stats(self) -> dict: ...


class _Stats:
    """Lookup results by kind and payload bytes moved. Plain counts: the serving side exports them
    (serve/metrics.py reads `stats()["requests"]`), so the cache works the same outside Ray."""

    def __init__(self, backend: str):
        self.backend = backend
        self._counts = {"hit": 0, "miss": 0, "error": 0, "bytes": 0}
        self._by_kind: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def count(self, kind: str, result: str) -> None:
        with self._lock:
            self._counts[result] += 1
            self._by_kind[kind, result] = self._by_kind.get((kind, result), 0) + 1

    def moved(self, nbytes: int) -> None:
        with self._lock:
            self._counts["bytes"] += nbytes

    def as_dict(self) -> dict:
        with self._lock:
            c, by_kind = dict(self._counts), dict(self._by_kind)
        return {"backend": self.backend, "hits": c["hit"], "misses": c["miss"], "errors": c["error"],
                "bytes": c["bytes"], "requests": by_kind}


class InProcessCache:
    """A thread-safe LRU bounded by payload bytes, with an optional TTL counted from the write.

    Local to one process (an L1 in front of Redis, or the only cache in tests and the CLI). Features
    are kept by reference, not copied or serialised: callers must not modify returned tensors in
    place. A single value larger than `max_bytes` is not stored.
    """

    backend = "memory"

    def __init__(self, max_bytes: int = 512 << 20, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if max_bytes <= 0 or (ttl_s is not None and ttl_s <= 0):
            raise ValueError(f"max_bytes must be > 0 and ttl_s > 0 or None, got {max_bytes}, {ttl_s}")
        self.max_bytes, self.ttl_s, self._clock = max_bytes, ttl_s, clock
        self._entries: OrderedDict[str, tuple[object, int, float]] = OrderedDict()  # key -> (value, nbytes, expires_at)
        self._bytes = 0
        self._lock = threading.RLock()  # re-entered by count_within_limit's read-then-_put
        self._stats = _Stats(self.backend)

    def _get(self, key: str, kind: str):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[2] <= self._clock():
                self._bytes -= self._entries.pop(key)[1]
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
        self._stats.count(kind, "miss" if entry is None else "hit")
        return None if entry is None else entry[0]

    def _put(self, key: str, value: object, nbytes: int, only_new: bool = False) -> bool:
        if nbytes > self.max_bytes:
            return False
        now = self._clock()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                if only_new and old[2] > now:
                    self._entries[key] = old  # re-inserted at the MRU end
                    return False
                self._bytes -= old[1]
            self._entries[key] = (value, nbytes, now + self.ttl_s if self.ttl_s is not None else float("inf"))
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][1]
        return True

    def put_image(self, image_id: str, data: bytes) -> bool:
        return self._put(f"img:{image_id}", bytes(data), len(data), only_new=True)

    def get_image(self, image_id: str) -> bytes | None:
        return self._get(f"img:{image_id}", "image")

    def put_features(self, key: FeatureKey, features: CoarseFeatures) -> None:
        self._put(key.as_str(), features, features.nbytes)

    def get_features(self, key: FeatureKey) -> CoarseFeatures | None:
        return self._get(key.as_str(), "features")

    def put_blob(self, key: str, data: bytes) -> None:
        self._put(f"blob:{key}", bytes(data), len(data))

    def get_blob(self, key: str) -> bytes | None:
        return self._get(f"blob:{key}", "blob")

    def count_within_limit(self, key: str, limit: int) -> bool:
        entry_key = f"count:{key}"
        with self._lock:
            entry = self._entries.get(entry_key)
            count = entry[0] if entry is not None and entry[2] > self._clock() else 0
            if count >= limit:
                return False
            # Each increment restarts the TTL, as a rewritten blob would.
            self._put(entry_key, count + 1, 8)
        return True

    def ping(self) -> bool:
        return True

    def stats(self) -> dict:
        with self._lock:
            held, entries = self._bytes, len(self._entries)
        return {**self._stats.as_dict(), "bytes": held, "entries": entries}


class RedisCache:
    """Redis-backed cache shared by every replica; fail-open.

    Any Redis error is logged (at most once per `_LOG_EVERY_S`), counted in `stats()["errors"]` and
    answered as a miss / no-op. A connection or timeout error also opens a `backoff_s` window in which
    calls skip Redis (and count as errors) instead of each waiting for a timeout; the first call after
    the window retries, and redis-py reconnects. `ping()` ignores the window, so a health check sees
    recovery at once. Values above `max_value_bytes` are not stored. `stats()["bytes"]` counts payload
    bytes moved to and from Redis by this process.
    """

    backend = "redis"
    _LOG_EVERY_S = 30.0
    # Check and increment in one server-side step, so concurrent replicas never count past the limit.
    # ARGV: limit, TTL in seconds ('' = none). Returns 1 when counted, 0 at the limit.
    _COUNT_WITHIN_LIMIT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
if ARGV[2] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "qzoom:", ttl_s: int | None = 86400,
                 max_value_bytes: int = 64 << 20, socket_timeout: float = 0.5, backoff_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if ttl_s is not None and int(ttl_s) < 1:
            raise ValueError(f"ttl_s must be a whole number of seconds >= 1 or None, got {ttl_s}")
        self.prefix, self.max_value_bytes, self.backoff_s = prefix, max_value_bytes, backoff_s
        self.ttl_s = None if ttl_s is None else int(ttl_s)
        self._url = re.sub(r"//[^@/]*@", "//***@", url)  # never log a password
        # One immediate retry: after a Redis restart the pool's first socket is stale. redis-py 8's
        # default (10 retries, jittered backoff up to 1 s each) would stall every request while it is down.
        self._redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, retry=Retry(NoBackoff(), 1)
        )
        self._count_script = self._redis.register_script(self._COUNT_WITHIN_LIMIT)
        self._unreachable = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._errors = (redis.RedisError, OSError)
        self._clock = clock
        self._down_until = 0.0
        self._failing = False
        self._last_log = float("-inf")
        self._suppressed = 0
        self._lock = threading.Lock()
        self._stats = _Stats(self.backend)

    def _report(self, kind: str, what: str) -> None:
        self._stats.count(kind, "error")
        now = self._clock()
        with self._lock:
            self._failing = True
            if now - self._last_log < self._LOG_EVERY_S:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last_log = self._suppressed, 0, now
        log.warning("redis cache %s: %s; serving without it (%d similar errors suppressed)",
                    self._url, what, suppressed)

    def _call(self, kind: str, fn: Callable) -> tuple[bool, object]:
        """Run fn(redis) unless inside the backoff window; (False, None) on any failure."""
        if self._clock() < self._down_until:
            self._report(kind, "skipped during backoff")
            return False, None
        try:
            value = fn(self._redis)
        except self._errors as exc:
            if isinstance(exc, self._unreachable):
                self._down_until = self._clock() + self.backoff_s
            self._report(kind, f"{type(exc).__name__}: {exc}")
            return False, None
        if self._failing:
            self._failing = False
            log.info("redis cache %s reachable again", self._url)
        return True, value

    def _set(self, kind: str, key: str, data: bytes, nx: bool = False) -> bool:
        if len(data) > self.max_value_bytes:
            log.debug("not caching %s: %d bytes > max_value_bytes %d", key, len(data), self.max_value_bytes)
            return False
        ok, stored = self._call(kind, lambda r: r.set(key, data, nx=nx, ex=self.ttl_s))
        if ok and stored:
            self._stats.moved(len(data))
        return bool(ok and stored)

    def _get(self, kind: str, key: str, parse: Callable | None = None):
        ok, data = self._call(kind, lambda r: r.get(key))
        if not ok:
            return None
        if data is None:
            self._stats.count(kind, "miss")
            return None
        self._stats.moved(len(data))
        if parse is not None:
            try:
                data = parse(data)
            except ValueError as exc:  # written by an incompatible version, or corrupted: recompute
                self._report(kind, f"unreadable value under {key}: {exc}")
                return None
        self._stats.count(kind, "hit")
        return data

    def put_image(self, image_id: str, data: bytes) -> bool:
        # SET NX: concurrent uploads of the same bytes store once; the first writer's TTL stands.
        return self._set("image", f"{self.prefix}img:{image_id}", data, nx=True)

    def get_image(self, image_id: str) -> bytes | None:
        return self._get("image", f"{self.prefix}img:{image_id}")

    def put_features(self, key: FeatureKey, features: CoarseFeatures) -> None:
        self._set("features", key.as_str(self.prefix), features.to_bytes())

    def get_features(self, key: FeatureKey) -> CoarseFeatures | None:
        return self._get("features", key.as_str(self.prefix), CoarseFeatures.from_bytes)

    def put_blob(self, key: str, data: bytes) -> None:
        self._set("blob", f"{self.prefix}blob:{key}", data)

    def get_blob(self, key: str) -> bytes | None:
        return self._get("blob", f"{self.prefix}blob:{key}")

    def count_within_limit(self, key: str, limit: int) -> bool:
        ttl = "" if self.ttl_s is None else str(self.ttl_s)
        ok, counted = self._call("count", lambda r: self._count_script(
            keys=[f"{self.prefix}count:{key}"], args=[int(limit), ttl], client=r))
        return bool(counted) if ok else True

    def ping(self) -> bool:
        try:
            self._redis.ping()
        except self._errors:
            return False
        self._down_until = 0.0
        return True

    def stats(self) -> dict:
        return self._stats.as_dict()


def make_cache(url: str | None, **kw) -> FeatureCache:
    """`None` or `memory://` → InProcessCache(**kw); `redis://`, `rediss://`, `unix://` → RedisCache(url, **kw)."""
    if url is None or url in ("", "memory://"):
        return InProcessCache(**kw)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisCache(url, **kw)
    raise ValueError(f"unsupported cache url {url!r}: use memory:// or redis://host:port/db")

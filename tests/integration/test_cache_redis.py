"""RedisCache against a real Redis: stored once, TTLs, keys that separate models and budgets, and
fail-open behaviour while Redis is down, slow, or restarting."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest
import torch

redis = pytest.importorskip("redis", reason="the redis client is not installed")

from qzoom_service.cache import CoarseFeatures, FeatureKey, RedisCache  # noqa: E402

from ..helpers import free_port  # noqa: E402
from .conftest import REDIS_URL, redis_reachable as _reachable  # noqa: E402

if not _reachable(REDIS_URL):
    pytest.skip(f"no Redis server answers at {REDIS_URL}", allow_module_level=True)


@pytest.fixture
def prefix():
    """A key prefix unique to this test; every key under it is deleted afterwards."""
    pre = f"qzoom-test-{uuid.uuid4().hex}:"
    yield pre
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{pre}*", count=500))
    if keys:
        client.delete(*keys)


@pytest.fixture
def raw():
    return redis.Redis.from_url(REDIS_URL)


@pytest.fixture
def cache(prefix):
    return RedisCache(REDIS_URL, prefix=prefix, ttl_s=600)


def _key(**kw) -> FeatureKey:
    base = dict(image_id="ab" * 32, model_id="Qwen/Qwen2.5-VL-3B-Instruct", model_revision="66285546d2b8",
                min_pixels=200704, max_pixels=451584, dtype="bfloat16")
    return FeatureKey(**{**base, **kw})


def _features() -> CoarseFeatures:
    embeds = torch.randn(20, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    return CoarseFeatures(embeds=embeds, grid_thw=torch.tensor([[1, 8, 10]]))



def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_image_is_stored_once_with_set_nx(cache, raw, prefix):
    assert cache.put_image("img1", b"first") is True
    assert cache.put_image("img1", b"second") is False  # NX: the stored value is never replaced
    assert cache.get_image("img1") == b"first"
    assert raw.get(f"{prefix}img:img1") == b"first"
    assert cache.ping() is True


def test_features_round_trip_bit_exact_as_one_safetensors_value(cache, raw):
    feats = _features()
    cache.put_features(_key(), feats)
    stored = raw.get(_key().as_str(cache.prefix))
    assert stored is not None and stored[8:9] == b"{"  # 8-byte header length, then a JSON header
    got = cache.get_features(_key())
    assert got is not None and got.embeds.dtype == torch.bfloat16
    assert torch.equal(got.embeds.view(torch.int16), feats.embeds.view(torch.int16))
    assert got.grid_thw.tolist() == [[1, 8, 10]]
    assert cache.stats()["hits"] == 1 and cache.stats()["bytes"] == 2 * len(stored)


def test_every_key_gets_the_configured_ttl(cache, raw, prefix):
    cache.put_image("img", b"x")
    cache.put_features(_key(), _features())
    cache.put_blob("crop:1", b"{}")
    keys = list(raw.scan_iter(match=f"{prefix}*"))
    assert len(keys) == 3
    assert all(0 < raw.ttl(k) <= 600 for k in keys)


def test_no_ttl_means_keys_persist(prefix, raw):
    cache = RedisCache(REDIS_URL, prefix=prefix, ttl_s=None)
    cache.put_blob("b", b"v")
    assert raw.ttl(f"{prefix}blob:b") == -1


def test_keys_name_model_revision_budget_and_dtype(cache, raw, prefix):
    cache.put_features(_key(), _features())
    (key,) = [k.decode() for k in raw.scan_iter(match=f"{prefix}feat:*")]
    for part in ("Qwen/Qwen2.5-VL-3B-Instruct@66285546d2b8", "200704-451584", "bfloat16", "ab" * 32):
        assert part in key
    for other in (_key(max_pixels=1003520), _key(min_pixels=3136), _key(dtype="float16"),
                  _key(model_revision="main"), _key(model_id="Qwen/Qwen2.5-VL-7B-Instruct")):
        assert cache.get_features(other) is None
    assert cache.get_features(_key()) is not None
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (1, 5)


def test_unreadable_feature_value_is_an_error_and_a_miss(cache, raw):
    raw.set(_key().as_str(cache.prefix), b"\x80\x04not-safetensors", ex=60)
    assert cache.get_features(_key()) is None
    assert (cache.stats()["errors"], cache.stats()["hits"]) == (1, 0)
    assert cache.get_image("img") is None and cache.get_image("img") is None  # still up: no backoff
    assert cache.stats()["misses"] == 2


def test_oversized_values_are_not_stored(prefix):
    cache = RedisCache(REDIS_URL, prefix=prefix, max_value_bytes=100)
    assert cache.put_image("big", bytes(101)) is False
    assert cache.get_image("big") is None


def test_closed_port_gives_misses_errors_and_one_log_line(caplog):
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    caplog.set_level(logging.WARNING, logger="qzoom_service.cache")
    start = time.monotonic()
    for _ in range(20):
        assert cache.put_image("img", b"x") is False
        assert cache.get_image("img") is None
        cache.put_features(_key(), _features())
        assert cache.get_features(_key()) is None
        assert cache.get_blob("b") is None
    assert time.monotonic() - start < 2.0  # refused connections and the backoff window keep calls cheap
    assert cache.ping() is False
    stats = cache.stats()
    assert stats["errors"] == 100 and stats["hits"] == stats["misses"] == 0
    assert len([r for r in caplog.records if "serving without it" in r.getMessage()]) == 1


def test_unresponsive_server_times_out_into_a_miss():
    # A listening socket that never answers: connect succeeds, the reply never comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        cache = RedisCache(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", socket_timeout=0.2)
        start = time.monotonic()
        assert cache.get_features(_key()) is None
        assert time.monotonic() - start < 1.5
        assert cache.get_image("img") is None  # inside the backoff window: skipped, no second wait
        assert time.monotonic() - start < 1.5
        assert cache.stats()["errors"] == 2


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server binary not on PATH")
def test_cache_recovers_after_redis_restarts():
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    procs = []

    def start():
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        assert _wait(lambda: _reachable(url), 5.0), "redis-server did not start"

    try:
        start()
        cache = RedisCache(url, socket_timeout=0.2, backoff_s=0.5)
        cache.put_blob("k", b"before")
        assert cache.get_blob("k") == b"before"

        procs[-1].kill()
        procs[-1].wait(5)
        assert cache.get_blob("k") is None
        cache.put_blob("k", b"lost")  # a no-op, not an exception
        assert cache.ping() is False
        errors_while_down = cache.stats()["errors"]
        assert errors_while_down >= 2

        start()

        def works():
            cache.put_blob("k", b"after")
            return cache.get_blob("k") == b"after"

        assert _wait(works, 2.0), "the cache did not recover within 2 s of Redis coming back"
        errors_after = cache.stats()["errors"]
        assert cache.get_blob("k") == b"after" and cache.ping() is True
        assert cache.stats()["errors"] == errors_after
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)


def test_count_within_limit_is_one_atomic_step_on_redis(prefix, raw):
    caches = [RedisCache(REDIS_URL, prefix=prefix, ttl_s=600) for _ in range(4)]  # four "replicas"
    barrier = threading.Barrier(16)
    granted = []

    def work(i):
        barrier.wait()
        granted.extend(caches[i % 4].count_within_limit("crops:img", 30) for _ in range(8))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert granted.count(True) == 30 and len(granted) == 128
    assert raw.get(f"{prefix}count:crops:img") == b"30"
    assert 0 < raw.ttl(f"{prefix}count:crops:img") <= 600
    assert caches[0].count_within_limit("crops:other", 30) is True


def test_count_within_limit_fails_open_when_redis_is_down():
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    assert cache.count_within_limit("crops:img", 1) is True and cache.count_within_limit("crops:img", 1) is True
    assert cache.stats()["errors"] == 2


def test_the_reachability_check_says_false_for_a_closed_port_instead_of_raising():
    # What test_serve_grpc skips on: redis-py's ping() raises ConnectionError here, it never returns False.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=0.5).ping()
    assert _reachable(f"redis://127.0.0.1:{free_port()}/0") is False
    assert _reachable(REDIS_URL) is True

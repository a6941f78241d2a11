"""The feature serialisation (safetensors, bit-exact, no pickle) and the in-process LRU cache."""

from __future__ import annotations

import json
import struct
import threading

import pytest
import torch

from qzoom_service.cache import CoarseFeatures, FeatureKey, InProcessCache, RedisCache, make_cache


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _features(dtype: torch.dtype, n: int = 12, d: int = 16) -> CoarseFeatures:
    embeds = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(dtype)
    # Values whose bit patterns a lossy path (a float round-trip, a cast) would change.
    embeds[0, :4] = torch.tensor([float("inf"), -0.0, float("nan"), 1e-40]).to(dtype)
    return CoarseFeatures(embeds=embeds, grid_thw=torch.tensor([[1, 6, 8]]))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _key(**kw) -> FeatureKey:
    base = dict(image_id="ab" * 32, model_id="Qwen/Qwen2.5-VL-7B-Instruct", model_revision="rev1",
                min_pixels=200704, max_pixels=451584, dtype="bfloat16")
    return FeatureKey(**{**base, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_features_round_trip_bit_exact(dtype):
    feats = _features(dtype)
    back = CoarseFeatures.from_bytes(feats.to_bytes())
    assert back.embeds.dtype == dtype and back.embeds.shape == feats.embeds.shape
    assert torch.equal(_bits(back.embeds), _bits(feats.embeds))
    assert back.grid_thw.dtype == torch.int64 and back.grid_thw.tolist() == [[1, 6, 8]]


def test_serialised_features_are_safetensors_not_pickle():
    data = _features(torch.bfloat16).to_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert header["image_embeds"]["dtype"] == "BF16" and header["image_grid_thw"]["shape"] == [1, 3]
    assert header["__metadata__"]["schema"] == "qzoom.coarse.v1"
    assert not data.startswith(b"\x80")  # every pickle protocol >= 2 starts with the PROTO opcode


def test_non_contiguous_and_int32_grid_are_normalised():
    base = torch.randn(16, 12)
    feats = CoarseFeatures(embeds=base.t(), grid_thw=torch.tensor([[1, 4, 6]], dtype=torch.int32))
    back = CoarseFeatures.from_bytes(feats.to_bytes())
    assert torch.equal(back.embeds, base.t()) and back.grid_thw.dtype == torch.int64


@pytest.mark.parametrize("blob", [b"", b"garbage", b"\x80\x04\x95"])
def test_unreadable_feature_blob_raises_value_error(blob):
    with pytest.raises(ValueError):
        CoarseFeatures.from_bytes(blob)


def test_feature_key_carries_every_field_and_escapes_delimiters():
    key = _key()
    s = key.as_str("qzoom:")
    assert s == f"qzoom:feat:v1:Qwen/Qwen2.5-VL-7B-Instruct@rev1:200704-451584:bfloat16:{'ab' * 32}"
    variants = [_key(min_pixels=1), _key(max_pixels=1), _key(dtype="float32"), _key(model_revision="rev2"),
                _key(model_id="other"), _key(image_id="cd" * 32)]
    assert len({v.as_str() for v in variants} | {key.as_str()}) == len(variants) + 1
    odd = _key(model_id="C:\\models\\my model", model_revision="a@b:c")
    model_field = odd.as_str().split(":")[2]
    assert model_field.count("@") == 1 and model_field.startswith("~")
    assert odd.as_str() == _key(model_id="C:\\models\\my model", model_revision="a@b:c").as_str()  # stable
    assert odd.as_str() != _key(model_id="C:\\models\\my model2", model_revision="a@b:c").as_str()


def test_put_image_stores_the_same_bytes_once():
    cache = InProcessCache()
    assert cache.put_image("img1", b"png-bytes") is True
    assert cache.put_image("img1", b"png-bytes") is False
    assert cache.get_image("img1") == b"png-bytes"


def test_lru_evicts_least_recently_used_by_bytes():
    cache = InProcessCache(max_bytes=3000)
    for name in "abc":
        cache.put_blob(name, bytes(1000))
    assert cache.get_blob("a") is not None  # a becomes most recently used
    cache.put_blob("d", bytes(1000))
    assert cache.get_blob("b") is None
    assert all(cache.get_blob(n) is not None for n in "acd")
    assert cache.stats()["bytes"] == 3000
    cache.put_blob("big", bytes(2500))  # pushes out two entries, not one
    assert cache.stats()["bytes"] <= 3000 and cache.stats()["entries"] == 1


def test_value_larger_than_budget_is_not_stored_and_evicts_nothing():
    cache = InProcessCache(max_bytes=1000)
    cache.put_blob("small", bytes(10))
    assert cache.put_image("huge", bytes(1001)) is False
    assert cache.get_image("huge") is None and cache.get_blob("small") == bytes(10)


def test_ttl_expires_entries_with_a_fake_clock():
    clock = FakeClock()
    cache = InProcessCache(ttl_s=10.0, clock=clock)
    assert cache.put_image("img", b"x")
    cache.put_features(_key(), _features(torch.float32))
    clock.now += 9.9
    assert cache.get_image("img") == b"x" and cache.get_features(_key()) is not None
    assert cache.put_image("img", b"x") is False
    clock.now += 0.2
    assert cache.get_image("img") is None and cache.get_features(_key()) is None
    assert cache.stats()["bytes"] == 0
    assert cache.put_image("img", b"x") is True  # an expired image is stored afresh


def test_features_round_trip_and_keys_separate_budgets():
    cache = InProcessCache()
    feats = _features(torch.bfloat16)
    cache.put_features(_key(), feats)
    got = cache.get_features(_key())
    assert got is not None and torch.equal(_bits(got.embeds), _bits(feats.embeds))
    assert cache.get_features(_key(max_pixels=1)) is None


def test_stats_count_hits_and_misses_by_kind():
    cache = InProcessCache()
    cache.put_blob("k", b"v")
    cache.get_blob("k"), cache.get_blob("k"), cache.get_blob("missing"), cache.get_image("0" * 64)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["errors"], stats["backend"]) == (2, 2, 0, "memory")
    assert stats["requests"] == {("blob", "hit"): 2, ("blob", "miss"): 1, ("image", "miss"): 1}


def test_concurrent_writers_keep_the_byte_budget():
    cache = InProcessCache(max_bytes=50_000)

    def work(t):
        for i in range(300):
            cache.put_blob(f"{t}-{i}", bytes(100 + (i % 7) * 50))
            cache.get_blob(f"{t}-{i // 2}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    held = sum(n for _, n, _ in cache._entries.values())
    assert held == cache.stats()["bytes"] <= 50_000


def test_make_cache_picks_the_backend_from_the_url():
    assert isinstance(make_cache(None), InProcessCache)
    assert isinstance(make_cache("memory://", max_bytes=10), InProcessCache)
    assert isinstance(make_cache("redis://127.0.0.1:1/0"), RedisCache)  # constructing does not connect
    with pytest.raises(ValueError, match="memory://"):
        make_cache("memcached://x")


def test_the_app_reads_the_redis_url_from_the_named_environment_variable(monkeypatch):
    from qzoom_service.serve.settings import AppSettings, build_engine

    monkeypatch.setenv("QZOOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    settings = AppSettings.from_dict({"redis_url_env": "QZOOM_TEST_REDIS_URL", "redis_url": "memory://"})
    _, cache = build_engine(settings)
    assert cache.backend == "redis"
    monkeypatch.delenv("QZOOM_TEST_REDIS_URL")
    _, fallback = build_engine(settings)
    assert fallback.backend == "memory"


def test_count_within_limit_stops_at_the_limit_and_counts_keys_apart():
    cache = InProcessCache()
    assert [cache.count_within_limit("img-a", 3) for _ in range(5)] == [True, True, True, False, False]
    assert cache.count_within_limit("img-b", 3) is True  # another key has its own count
    assert cache.count_within_limit("img-a", 4) is True  # a higher limit counts on from 3
    assert cache.count_within_limit("img-a", 4) is False


def test_count_within_limit_restarts_after_the_ttl():
    clock = FakeClock()
    cache = InProcessCache(ttl_s=10.0, clock=clock)
    assert cache.count_within_limit("img", 1) is True and cache.count_within_limit("img", 1) is False
    clock.now += 10.1
    assert cache.count_within_limit("img", 1) is True


def test_concurrent_counts_never_pass_the_limit():
    cache = InProcessCache()
    barrier = threading.Barrier(8)
    granted = []

    def work():
        barrier.wait()
        granted.extend(cache.count_within_limit("img", 25) for _ in range(10))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert granted.count(True) == 25 and len(granted) == 80

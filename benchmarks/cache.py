"""ZoomRegion with a question on an image whose coarse features are cached vs a cold one.

    .venv/bin/python benchmarks/cache.py [--model PATH] [--n 12] [--redis-url redis://127.0.0.1:6379/15]

Each of n fresh images is uploaded, then zoomed twice at the same box: the first call computes the
coarse vision features (cold), the second finds them in the cache (warm). Keys use a throwaway prefix
that is deleted afterwards. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import grpc

from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from service_overhead import demo_png, percentiles, start_service  # noqa: E402  (sibling script)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    prefix = f"qzoom-bench-{uuid.uuid4().hex[:8]}:"
    address = start_service(args.model, {"max_new_tokens": 8, "redis_url": args.redis_url, "cache_prefix": prefix})
    stub = pb_grpc.QZoomServiceStub(grpc.insecure_channel(address))
    cold, warm, hits = [], [], []
    try:
        for i in range(args.n + 1):
            image_id = stub.UploadImage(pb.UploadImageRequest(image=demo_png(seed=100 + i))).image_id
            request = pb.ZoomRegionRequest(image_id=image_id, box=pb.Box(x1=300, y1=200, x2=600, y2=450),
                                           space=pb.COORD_SPACE_ORIGINAL, question="What colour is the square?")
            for sink in (cold, warm):
                start = time.perf_counter()
                response = stub.ZoomRegion(request)
                if i:  # the first image only warms up the replicas
                    sink.append((time.perf_counter() - start) * 1000)
                    hits.append(response.cache_hit)
    finally:
        from ray import serve

        serve.shutdown()
        import redis

        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
    result = {"benchmark": "cache", "cache": args.redis_url, "cold": percentiles(cold), "warm": percentiles(warm),
              "warm_hit_rate": sum(hits[1::2]) / len(hits[1::2]), "cold_hit_rate": sum(hits[0::2]) / len(hits[0::2])}
    result["speedup_p50"] = result["cold"]["p50_ms"] / result["warm"]["p50_ms"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

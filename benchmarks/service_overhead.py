"""Answer through gRPC + Ray Serve vs the same engine called in-process: p50/p99 latency and their ratio.

    .venv/bin/python benchmarks/service_overhead.py [--model PATH] [--n 60] [--out benchmarks/results]

Both sides run the same model, image, question and options in one run on one machine; the service adds
the gRPC proxy, Serve routing, the ingress validation and the cache. Not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import socket
import statistics
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, ImageDraw

from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc
from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine
from qzoom_service.model import load_for_config
from qzoom_service.types import Request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_png(seed: int = 0, size=(1024, 768)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    ImageDraw.Draw(img).rectangle([400, 300, 440, 340], fill=(255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def percentiles(ms: list[float]) -> dict:
    ordered = sorted(ms)
    return {"p50_ms": statistics.median(ordered), "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "mean_ms": statistics.mean(ordered), "n": len(ordered)}


def start_service(model: str | None, args: dict) -> str:
    from qzoom_service.serve.run import start_local

    small = {"ray_actor_options": {"num_cpus": 0.5}}
    return start_local({"model": model, **args}, {"CoarseGate": small, "Zoom": small},
                       {"port": free_port()}, {"port": free_port()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--mode", choices=["direct", "zoom"], default="direct")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    image = demo_png()
    engine_args = {"max_new_tokens": 8}
    options = RequestOptions(mode=args.mode, max_new_tokens=8, roi_threshold=0.5)

    config = EngineConfig(model=args.model, **engine_args)
    engine = QZoomEngine(load_for_config(config), config)
    engine.answer([Request(image, "What colour is the square?", options)])  # warm-up
    local = []
    for _ in range(args.n):
        start = time.perf_counter()
        engine.answer([Request(image, "What colour is the square?", options)])
        local.append((time.perf_counter() - start) * 1000)

    address = start_service(args.model, engine_args)
    stub = pb_grpc.QZoomServiceStub(grpc.insecure_channel(address))
    mode = pb.MODE_DIRECT if args.mode == "direct" else pb.MODE_ZOOM
    request = pb.AnswerRequest(image=image, question="What colour is the square?",
                               options=pb.AnswerOptions(mode=mode, roi_threshold=0.5, max_new_tokens=8))
    for _ in range(3):
        stub.Answer(request)  # warm-up: first calls set up routing and the replicas' caches
    remote = []
    for _ in range(args.n):
        start = time.perf_counter()
        stub.Answer(request)
        remote.append((time.perf_counter() - start) * 1000)
    from ray import serve

    serve.shutdown()
    result = {
        "benchmark": "service_overhead",
        "model": engine.loaded.model_id,
        "mode": args.mode,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "image_bytes": len(image),
        "in_process": percentiles(local),
        "grpc_ray_serve": percentiles(remote),
    }
    result["ratio_p50"] = result["grpc_ray_serve"]["p50_ms"] / result["in_process"]["p50_ms"]
    result["ratio_p99"] = result["grpc_ray_serve"]["p99_ms"] / result["in_process"]["p99_ms"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"service_overhead_{args.mode}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

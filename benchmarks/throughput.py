"""Throughput under concurrency: req/s, p50 and p99 at 1/2/4/8/16 concurrent clients, through a real
`qzoom serve` (started here, joined on 127.0.0.1) and in-process (`engine.answer` on batches vs single calls).

    .venv/bin/python benchmarks/throughput.py [--model PATH] [--requests 32] [--levels 1,2,4,8,16]
                                              [--out benchmarks/results]

Workloads: Answer direct, Answer zoom, ZoomRegion without a question. Every request carries an image of its
own (no feature-cache hits across requests). The goals are ratios within one run (8 clients vs 1), since
absolute numbers depend on the machine and its load (the load average is recorded). Not a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, ImageDraw

from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

QUESTION = "What colour is the square?"
MAX_NEW_TOKENS = 8
GOALS = {"answer_direct": 3.0, "answer_zoom": 2.5, "zoom_region": 4.0}  # 8-client / 1-client throughput


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_png(seed: int, size=(640, 480)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    ImageDraw.Draw(img).rectangle([250, 180, 300, 230], fill=(255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def summary(latencies_s: list[float], wall_s: float) -> dict:
    ms = sorted(x * 1000 for x in latencies_s)
    return {"req_per_s": len(ms) / wall_s, "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "n": len(ms), "wall_s": wall_s}


def _request(workload: str, seed: int):
    image = image_png(seed)
    if workload == "zoom_region":
        return "ZoomRegion", pb.ZoomRegionRequest(image=image, box=pb.Box(x1=200, y1=150, x2=360, y2=270),
                                                  space=pb.COORD_SPACE_ORIGINAL)
    mode = pb.MODE_DIRECT if workload == "answer_direct" else pb.MODE_ZOOM
    return "Answer", pb.AnswerRequest(image=image, question=QUESTION, options=pb.AnswerOptions(
        mode=mode, roi_threshold=0.5, max_new_tokens=MAX_NEW_TOKENS))


def run_level(stub, calls: list, clients: int) -> dict:
    """Send `calls` from `clients` threads, each taking the next call when its previous one returns."""
    def one(call):
        method, request = call
        started = time.perf_counter()
        getattr(stub, method)(request, timeout=120)
        return time.perf_counter() - started

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, calls))
    return summary(latencies, time.perf_counter() - started)


@contextmanager
def started(argv: list[str], log: Path, ready: str, env: dict | None = None, timeout: float = 600):
    """Run `argv` in a process group of its own until `ready` is in its log; stop that group afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while ready not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[2:4]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only the process group started here
        except ProcessLookupError:
            pass


@contextmanager
def serving(model: str | None, workdir: Path):
    """A Ray head of our own (never whatever cluster /tmp/ray points at) and `qzoom serve` joined to it."""
    port, grpc_port = free_port(), free_port()
    head = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
            "--num-cpus=8", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats"]
    serve = [sys.executable, "-m", "qzoom_service.cli", "serve", "--grpc-port", str(grpc_port),
             "--http-port", str(free_port()), "--dashboard-port", str(free_port()), "--host", "127.0.0.1"]
    serve += ["--model", model] if model else []
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # a token of this run's own
    with started(head, workdir / "ray.log", "Ray runtime started", env=auth):
        with started(serve, workdir / "serve.log", "qzoom serving gRPC on",
                     env={**auth, "RAY_ADDRESS": f"127.0.0.1:{port}"}):
            yield f"127.0.0.1:{grpc_port}"


def service_levels(model: str | None, levels: list[int], n: int, workdir: Path) -> dict:
    with serving(model, workdir) as address:
        stub = pb_grpc.QZoomServiceStub(grpc.insecure_channel(address))
        results, seed = {}, 10_000
        for workload in GOALS:
            for _ in range(3):  # warm-up: routing, the replicas' first calls
                seed += 1
                method, request = _request(workload, seed)
                getattr(stub, method)(request, timeout=120)
            results[workload] = {}
            for clients in levels:
                calls = [_request(workload, seed + i) for i in range(1, n + 1)]
                seed += n
                results[workload][str(clients)] = run_level(stub, calls, clients)
                print(workload, clients, json.dumps(results[workload][str(clients)]), flush=True)
        return results


def in_process_levels(model: str | None, batch_sizes: list[int], n: int) -> tuple[str, dict]:
    """`engine.answer` over the same number of requests, as single calls and as batches of each size."""
    from qzoom_service.config import EngineConfig, RequestOptions
    from qzoom_service.engine import QZoomEngine
    from qzoom_service.model import load_for_config
    from qzoom_service.types import Request

    config = EngineConfig(model=model, max_new_tokens=MAX_NEW_TOKENS, max_batch_size=max(batch_sizes))
    engine = QZoomEngine(load_for_config(config), config)
    results = {}
    for workload, mode in (("answer_direct", "direct"), ("answer_zoom", "zoom")):
        options = RequestOptions(mode=mode, roi_threshold=0.5, max_new_tokens=MAX_NEW_TOKENS)
        requests = [Request(image_png(20_000 + i), QUESTION, options) for i in range(n)]
        engine.answer(requests[:2])  # warm-up
        results[workload] = {}
        for size in batch_sizes:
            latencies, started = [], time.perf_counter()
            for i in range(0, n, size):
                batch_started = time.perf_counter()
                engine.answer(requests[i:i + size])
                latencies += [time.perf_counter() - batch_started] * len(requests[i:i + size])
            results[workload][str(size)] = summary(latencies, time.perf_counter() - started)
            print("in-process", workload, size, json.dumps(results[workload][str(size)]), flush=True)
    return engine.loaded.model_id, results


def goals(service: dict) -> dict:
    out = {}
    for workload, goal in GOALS.items():
        levels = service.get(workload, {})
        if "1" in levels and "8" in levels:
            ratio = levels["8"]["req_per_s"] / levels["1"]["req_per_s"]
            out[workload] = {"ratio_8_vs_1": ratio, "goal": goal, "met": ratio >= goal}
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (the `plot` extra): no plot")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for workload, levels in result["service"].items():
        xs = [int(c) for c in levels]
        a.plot(xs, [levels[c]["req_per_s"] for c in levels], marker="o", label=workload)
        b.plot(xs, [levels[c]["p50_ms"] for c in levels], marker="o", label=f"{workload} p50")
    for workload, levels in result["in_process"].items():
        xs = [int(c) for c in levels]
        a.plot(xs, [levels[c]["req_per_s"] for c in levels], marker="s", ls="--", label=f"in-process {workload}")
    a.set(xscale="log", xlabel="concurrent clients (in-process: batch size)", ylabel="req/s",
          title="Throughput through qzoom serve")
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="p50 latency")
    a.set_xticks(xs, [str(x) for x in xs])
    b.set_xticks(xs, [str(x) for x in xs])
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle(f"throughput: {result['model']}, {result['cpu_count']} CPUs, load {result['load_average_start']}")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory; default: the embedded model")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    load_start = [round(x, 2) for x in os.getloadavg()]
    model_id, in_process = in_process_levels(args.model, [b for b in levels if b <= 8], args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        service = service_levels(args.model, levels, args.requests, Path(tmp))
    result = {
        "benchmark": "throughput",
        "model": model_id,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "requests_per_level": args.requests,
        "service": service,
        "in_process": in_process,
        "goals_8_vs_1": goals(service),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "throughput.png")
    print(json.dumps(result["goals_8_vs_1"], indent=2))


if __name__ == "__main__":
    main()

"""A 6-step zoom trajectory on one image, two ways: upload once and zoom by handle (crop handles, coarse
features cached) vs the image re-sent inline at every step to a service without a feature cache.

    .venv/bin/python benchmarks/agent_trajectory.py [--model PATH] [--reps 5] [--out benchmarks/results]

Each step is a ZoomRegion with a question (what an agent does when it asks about the region it zoomed
into). The handle path sends nested boxes relative to earlier crops (0-1000 of the crop); the inline path
sends the same boxes in original pixels, computed from the handle path's answers, so both crop the same
regions. Per step: latency (p50 over repetitions, a fresh image each repetition) and bytes sent (the
serialized request; the upload counts towards step 1). One Ray Serve instance runs both applications:
`qzoom` (in-process cache) and `nocache` (a cache too small to hold anything). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import grpc

from qzoom_client._proto.qzoom.v1 import qzoom_pb2 as pb
from qzoom_client._proto.qzoom.v1 import qzoom_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from service_overhead import demo_png, start_service  # noqa: E402  (sibling script)

QUESTION = "What is in this region?"
# (source step or None for the original image, box in 0-1000 of that source)
STEPS = [(None, [500, 500, 1000, 1000]), (0, [0, 0, 600, 600]), (1, [200, 200, 800, 800]),
         (None, [0, 0, 500, 500]), (3, [250, 250, 750, 750]), (None, [250, 250, 750, 750])]
ENGINE_ARGS = {"max_new_tokens": 8}
OPTIONS = pb.AnswerOptions(max_new_tokens=8)


def timed(call, request, app: str):
    start = time.perf_counter()
    response = call(request, metadata=(("application", app),))
    return response, (time.perf_counter() - start) * 1000


def by_handle(stub, image: bytes) -> list[dict]:
    """Upload once, then every step by image_id (+ crop_id for a nested step)."""
    upload = pb.UploadImageRequest(image=image)
    up, upload_ms = timed(stub.UploadImage, upload, "qzoom")
    steps, crops = [], []
    for i, (source, box) in enumerate(STEPS):
        request = pb.ZoomRegionRequest(image_id=up.image_id, crop_id=crops[source] if source is not None else "",
                                       box=pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]),
                                       space=pb.COORD_SPACE_NORM1000, question=QUESTION, options=OPTIONS)
        z, ms = timed(stub.ZoomRegion, request, "qzoom")
        crops.append(z.crop_id)
        sent = request.ByteSize() + (upload.ByteSize() if i == 0 else 0)
        steps.append({"ms": ms + (upload_ms if i == 0 else 0), "bytes_sent": sent, "bytes_received": z.ByteSize(),
                      "cache_hit": z.cache_hit, "box": [z.box.original.x1, z.box.original.y1, z.box.original.x2,
                                                        z.box.original.y2]})
    return steps


def inline(stub, image: bytes, boxes: list[list[float]]) -> list[dict]:
    """The image bytes in every request, boxes in original pixels, against the application without a cache."""
    steps = []
    for box in boxes:
        request = pb.ZoomRegionRequest(image=image, box=pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]),
                                       space=pb.COORD_SPACE_ORIGINAL, question=QUESTION, options=OPTIONS)
        z, ms = timed(stub.ZoomRegion, request, "nocache")
        steps.append({"ms": ms, "bytes_sent": request.ByteSize(), "bytes_received": z.ByteSize(),
                      "cache_hit": z.cache_hit, "box": [z.box.original.x1, z.box.original.y1, z.box.original.x2,
                                                        z.box.original.y2]})
    return steps


def summarise(runs: list[list[dict]]) -> dict:
    per_step = [{"p50_ms": statistics.median(r[i]["ms"] for r in runs), "bytes_sent": runs[0][i]["bytes_sent"],
                 "bytes_received": runs[0][i]["bytes_received"],
                 "cache_hit_rate": sum(r[i]["cache_hit"] for r in runs) / len(runs)} for i in range(len(STEPS))]
    return {"steps": per_step, "total_p50_ms": statistics.median(sum(s["ms"] for s in r) for r in runs),
            "total_bytes_sent": sum(s["bytes_sent"] for s in runs[0])}


def start_nocache(model: str | None) -> None:
    import ray

    from qzoom_service.serve.run import deploy
    from qzoom_service.serve.settings import IMPORT_PATH

    small = {"ray_actor_options": {"num_cpus": 0.5}}
    args = {"model": model, **ENGINE_ARGS, "cache_max_bytes": 1}  # nothing fits: every request recomputes
    app = {"name": "nocache", "route_prefix": "/nocache", "import_path": IMPORT_PATH, "args": args,
           "deployments": [{"name": n, **small} for n in ("CoarseGate", "Zoom")]}
    deploy(f"http://{ray.init(ignore_reinit_error=True).dashboard_url}", {"applications": [app]})


def plot(result: dict, out: Path) -> None:
    """Per-step latency and cumulative bytes sent (needs matplotlib, the `plot` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    handle, inl = result["by_handle"]["steps"], result["inline_no_cache"]["steps"]
    steps = list(range(1, len(handle) + 1))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.4
    a.bar([s - width / 2 for s in steps], [s["p50_ms"] for s in handle], width, label="by handle, cached")
    a.bar([s + width / 2 for s in steps], [s["p50_ms"] for s in inl], width, label="inline, no cache")
    a.set_xlabel("step")
    a.set_ylabel("p50 latency (ms)")
    a.set_title("ZoomRegion + question, per step")
    a.legend()

    def cumulative(rows):
        total, out_ = 0, []
        for r in rows:
            total += r["bytes_sent"]
            out_.append(total / 1e6)
        return out_

    b.plot(steps, cumulative(handle), marker="o", label="by handle (upload counted at step 1)")
    b.plot(steps, cumulative(inl), marker="o", label="inline")
    b.set_xlabel("step")
    b.set_ylabel("MB sent (cumulative)")
    b.set_title(f"image {result['image_bytes'] / 1e6:.1f} MB, {result['image_size']}")
    b.legend()
    fig.suptitle(f"agent_trajectory: {result['model']}, total p50 x{result['speedup_total_p50']:.2f}, "
                 f"bytes x{result['bytes_ratio']:.1f}")
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    size = (1344, 1008)
    address = start_service(args.model, ENGINE_ARGS)
    try:
        start_nocache(args.model)
        from qzoom_service.serve.run import wait_until_healthy

        wait_until_healthy(address, application="nocache")
        stub = pb_grpc.QZoomServiceStub(grpc.insecure_channel(address))
        warm = demo_png(seed=999, size=size)  # first calls set up routing and the replicas
        inline(stub, warm, [s["box"] for s in by_handle(stub, warm)])
        handle_runs, inline_runs = [], []
        for rep in range(args.reps):
            image = demo_png(seed=300 + rep, size=size)  # a fresh image: step 1 of the handle path is a cold miss
            handle_runs.append(by_handle(stub, image))
            inline_runs.append(inline(stub, image, [s["box"] for s in handle_runs[-1]]))
            assert [s["box"] for s in inline_runs[-1]] == [s["box"] for s in handle_runs[-1]]
        health = stub.Health(pb.HealthRequest(), metadata=(("application", "qzoom"),))
    finally:
        from ray import serve

        serve.shutdown()
    result = {
        "benchmark": "agent_trajectory",
        "model": health.model_id,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "image_size": f"{size[0]}x{size[1]}",
        "image_bytes": len(demo_png(seed=300, size=size)),
        "reps": args.reps,
        "steps": [{"source_step": s, "box_norm1000_of_source": b} for s, b in STEPS],
        "by_handle": summarise(handle_runs),
        "inline_no_cache": summarise(inline_runs),
    }
    result["speedup_total_p50"] = result["inline_no_cache"]["total_p50_ms"] / result["by_handle"]["total_p50_ms"]
    result["bytes_ratio"] = result["inline_no_cache"]["total_bytes_sent"] / result["by_handle"]["total_bytes_sent"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent_trajectory.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    try:
        plot(result, out / "agent_trajectory.png")
        print("wrote", out / "agent_trajectory.png")
    except ImportError:
        print("matplotlib is missing (pip install -e '.[plot]'): no plot", file=sys.stderr)


if __name__ == "__main__":
    main()

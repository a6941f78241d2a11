"""Direct vs zoom vs full-resolution baseline on one engine: visual tokens and latency per route.

    .venv/bin/python benchmarks/engine_latency.py [--model PATH] [--n 8] [--repeats 3] [--out benchmarks/results]

Without --model it uses the tiny random model (the numbers then show the cost structure of the routes,
not a real model's speed). Ratios are taken within one run on one machine; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine
from qzoom_service.model import load_for_config
from qzoom_service.types import Request


def _image(seed: int, size=(1344, 1008)) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    x, y = int(rng.integers(0, size[0] - 60)), int(rng.integers(0, size[1] - 60))
    ImageDraw.Draw(img).rectangle([x, y, x + 40, y + 40], fill=(255, 0, 0))
    return img


def _routes(width: int, height: int, coarse_max: int) -> dict[str, RequestOptions]:
    full = min(width * height, 16384 * 784)
    return {
        "direct": RequestOptions(mode="direct", max_pixels=coarse_max),
        "zoom": RequestOptions(mode="zoom", max_pixels=coarse_max, roi_threshold=0.5),
        "full_resolution": RequestOptions(mode="direct", min_pixels=full, max_pixels=full),
    }


def run(engine: QZoomEngine, n: int, repeats: int, coarse_max: int, max_new_tokens: int) -> dict:
    images = [_image(i) for i in range(n)]
    out = {}
    for name, opts in _routes(*images[0].size, coarse_max).items():
        opts = RequestOptions(**{**opts.__dict__, "max_new_tokens": max_new_tokens})
        engine.answer([Request(images[0], "What colour is the small square?", opts)])  # warm-up
        lat, tokens, stages = [], [], {}
        for img in images:
            for _ in range(repeats):
                start = time.perf_counter()
                r = engine.answer([Request(img, "What colour is the small square?", opts)])[0]
                lat.append((time.perf_counter() - start) * 1000)
                tokens.append(r.visual_tokens["coarse"] + r.visual_tokens["zoom"])
                for k, v in r.timings_ms.items():
                    stages.setdefault(k, []).append(v)
        out[name] = {
            "mean_latency_ms": statistics.mean(lat),
            "p50_latency_ms": statistics.median(lat),
            "mean_visual_tokens": statistics.mean(tokens),
            "stage_ms": {k: statistics.mean(v) for k, v in stages.items()},
        }
    base = out["full_resolution"]["mean_latency_ms"]
    for name in out:
        out[name]["speedup_vs_full_resolution"] = base / out[name]["mean_latency_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--coarse-max-pixels", type=int, default=576 * 784)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = EngineConfig(model=args.model, device=args.device, max_new_tokens=args.max_new_tokens)
    engine = QZoomEngine(load_for_config(config), config)
    results = {
        "benchmark": "engine_latency",
        "model": engine.loaded.model_id,
        "device": args.device,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "n_images": args.n,
        "repeats": args.repeats,
        "image_size": list(_image(0).size),
        "routes": run(engine, args.n, args.repeats, args.coarse_max_pixels, args.max_new_tokens),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_latency.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["routes"], indent=2))


if __name__ == "__main__":
    main()

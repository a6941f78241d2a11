"""In-process batching gain: `engine.answer` on N requests at once vs N single calls, per mode.

    .venv/bin/python benchmarks/engine_batching.py [--model PATH] [--device cpu] [--n 8] [--repeats 3]

Without --model it uses the embedded model (`load_for_config(EngineConfig())`). The ratio is
(time of N single calls) / (time of one batch of N), medians over the repeats; > 1 means batching pays.
Wall time and this process's CPU time are both reported: on a shared machine the wall clock also counts
other work (the load average is recorded for that reason). Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
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

_SIZES = ((640, 480), (480, 640), (800, 600), (512, 512), (1024, 512), (600, 900), (700, 700), (900, 400))
_QUESTIONS = ("What colour is the small square?", "Is there a square?", "Where is the red square in the image?")


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = _SIZES[seed % len(_SIZES)]
    img = Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
    x, y = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
    ImageDraw.Draw(img).rectangle([x, y, x + 40, y + 40], fill=(255, 0, 0))
    return img


def _requests(n: int, mode: str, max_new_tokens: int) -> list[Request]:
    extra = {"roi_threshold": 0.3} if mode == "zoom" else {}
    options = RequestOptions(mode=mode, max_new_tokens=max_new_tokens, **extra)
    return [Request(_image(i), _QUESTIONS[i % len(_QUESTIONS)], options) for i in range(n)]


def _seconds(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _stage_ms(results) -> dict[str, float]:
    """Each stage's time summed over the rows (the engine's own per-request timings)."""
    names = sorted({k for r in results for k in r.timings_ms if k != "total"})
    return {k: round(sum(r.timings_ms.get(k, 0.0) for r in results), 1) for k in names}


def run(engine: QZoomEngine, n: int, repeats: int, max_new_tokens: int) -> dict:
    out = {}
    for mode in ("direct", "zoom"):
        requests = [engine.prepare(r) for r in _requests(n, mode, max_new_tokens)]  # preprocessing is not batched
        engine.answer(requests[:2])  # warm-up
        singles, batches = [], []
        for _ in range(repeats):
            singles.append(_seconds(lambda: [engine.answer([r]) for r in requests]))
            batches.append(_seconds(lambda: engine.answer(requests)))
        batch = engine.answer(requests)
        single = [engine.answer([r])[0] for r in requests]
        out[mode] = {"zoomed": [r.route for r in batch].count("zoom"),
                     "stage_ms_batch": _stage_ms(batch), "stage_ms_singles": _stage_ms(single)}
        for i, clock in enumerate(("wall", "cpu")):
            single, batch = statistics.median(s[i] for s in singles), statistics.median(b[i] for b in batches)
            out[mode].update({f"singles_{clock}_s": single, f"batch_{clock}_s": batch,
                              f"ratio_{clock}": single / batch})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EngineConfig(model=args.model, device=args.device, max_new_tokens=args.max_new_tokens)
    engine = QZoomEngine(load_for_config(config), config)
    results = {
        "benchmark": "engine_batching",
        "model": engine.loaded.model_id,
        "device": args.device,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "load_average_before": os.getloadavg(),
        "batch_size": args.n,
        "repeats": args.repeats,
        "modes": run(engine, args.n, args.repeats, args.max_new_tokens),
        "load_average_after": os.getloadavg(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_batching.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

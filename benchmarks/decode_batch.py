"""Batched greedy decoding vs one row at a time: tokens/s of `decode_batch` over N rows vs N single decodes.

    .venv/bin/python benchmarks/decode_batch.py [--model PATH] [--device cpu] [--rows 8] [--tokens 32] [--out DIR]

Rows are real direct-route prefills (different images and questions, so different prompt lengths) of the
embedded model unless --model names another. Every row decodes exactly --tokens tokens (no stop ids), so
both sides do the same work; it also counts the rows whose ids agree (all of them in fp32). The load average is
recorded because the ratio means little on a busy machine. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qzoom_service import decode
from qzoom_service.coarse import encode_images, prefill_to_k
from qzoom_service.config import EngineConfig, RequestOptions
from qzoom_service.engine import QZoomEngine
from qzoom_service.model import load_for_config
from qzoom_service.types import Request

QUESTIONS = ["What colour is the box?", "Read the digit.", "Describe the image in one short sentence.",
             "Is there a red square in the upper half of the picture?"]


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    w, h = 300 + 97 * (i % 5), 260 + 71 * (i % 3)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def prefilled_items(engine: QZoomEngine, rows: int, tokens: int) -> list[decode.DecodeItem]:
    model = engine.model
    items = []
    for i in range(rows):
        p = engine.prepare(Request(_image(i), QUESTIONS[i % len(QUESTIONS)], RequestOptions(mode="direct")))
        (embeds,) = encode_images(model, p.pixel_values, p.grid_thw)
        state = prefill_to_k(model, p, embeds, engine.loaded.branch_layer)
        hidden = decode.finish_prefill(model, state)
        item = decode.decode_item(model, hidden, state.cache, state.positions[:, :, -1:], p.input_ids, tokens)
        items.append(dataclasses.replace(item, stop_ids=frozenset()))  # fixed work per row
    return items


def _fresh(items):
    return [dataclasses.replace(item, cache=copy.deepcopy(item.cache)) for item in items]  # decoding extends caches


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(engine: QZoomEngine, rows: int, tokens: int, repeats: int, device: str) -> dict:
    items = prefilled_items(engine, rows, tokens)
    single_s, batch_s = [], []
    for _ in range(repeats + 1):  # the first round warms up
        fresh = _fresh(items)
        _sync(device)
        start = time.perf_counter()
        single = [decode.decode_batch(engine.model, [item])[0] for item in fresh]
        _sync(device)
        single_s.append(time.perf_counter() - start)
        fresh = _fresh(items)
        _sync(device)
        start = time.perf_counter()
        batched = decode.decode_batch(engine.model, fresh)
        _sync(device)
        batch_s.append(time.perf_counter() - start)
    generated = sum(len(ids) for ids in batched)
    single_best, batch_best = min(single_s[1:]), min(batch_s[1:])
    return {
        "rows": rows,
        "prompt_lengths": [int(item.prompt_ids.shape[1]) for item in items],
        "tokens_per_row": tokens,
        "single_tokens_per_s": generated / single_best,
        "batched_tokens_per_s": generated / batch_best,
        "speedup": single_best / batch_best,
        "rows_with_same_ids": sum(b == s for b, s in zip(batched, single)),  # all of them in fp32
        "load_average_1_5_15": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "dtype": str(engine.model.dtype),
        "machine": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = EngineConfig(model=args.model, device=args.device,
                          **({"dtype": args.dtype} if args.dtype else {}))
    engine = QZoomEngine(load_for_config(config), config)
    model_id = engine.loaded.model_id
    result = {"model": Path(model_id).name if Path(model_id).is_dir() else model_id, **run(engine, args.rows, args.tokens, args.repeats, args.device)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"decode_batch_{args.device.split(':')[0]}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

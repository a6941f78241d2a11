"""`qzoom` command line: `qzoom answer` runs the engine in-process on one image."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import MODES, EngineConfig, RequestOptions
from .errors import QZoomError

__all__ = ["main"]

log = logging.getLogger("qzoom")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (Hugging Face layout) or hub id; default: the embedded model")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    p.add_argument("--attn-implementation", choices=["sdpa", "eager"], help="default sdpa")
    p.add_argument("--reuse-src-pos", choices=["true", "false"],
                   help="RoI position scheme; default: the checkpoint's config.json")


def _request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="auto: the gate decides; direct: gate forced closed; zoom: gate forced open")
    p.add_argument("--gate-threshold", type=float, help="zoom when the gate score >= this (probability)")
    p.add_argument("--roi-threshold", type=float, help="foreground threshold of the blurred RoI map")
    p.add_argument("--min-pixels", type=int, help="coarse budget: minimum model-input pixels")
    p.add_argument("--max-pixels", type=int, help="coarse budget: maximum model-input pixels")
    p.add_argument("--zoom-min-pixels", type=int, help="zoom budget (default: the coarse budget)")
    p.add_argument("--zoom-max-pixels", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--repetition-penalty", type=float,
                   help="default: the checkpoint's generation_config.json (1.0 = none)")
    p.add_argument("--prompt-suffix", default="",
                   help='appended to the question, e.g. "\\nAnswer the question using a single word or phrase."')


def engine_config_from_args(args) -> EngineConfig:
    reuse = None if args.reuse_src_pos is None else args.reuse_src_pos == "true"
    return EngineConfig.from_env(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        reuse_src_pos=reuse,
    )


def request_options_from_args(args) -> RequestOptions:
    return RequestOptions(
        mode=args.mode,
        gate_threshold=args.gate_threshold,
        roi_threshold=args.roi_threshold,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        zoom_min_pixels=args.zoom_min_pixels,
        zoom_max_pixels=args.zoom_max_pixels,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        prompt_suffix=args.prompt_suffix.encode().decode("unicode_escape"),
    ).validate()


def cmd_answer(args) -> int:
    from .engine import QZoomEngine
    from .model import load_for_config
    from .overlay import draw_overlay
    from .types import Request

    image_path = Path(args.image)
    if not image_path.is_file():
        raise SystemExit(f"qzoom answer: --image {image_path} does not exist")
    config = engine_config_from_args(args)
    options = request_options_from_args(args)
    engine = QZoomEngine(load_for_config(config), config)
    result = engine.answer([Request(image_path.read_bytes(), args.question, options)])[0]
    if args.overlay:
        image = engine.prepare(Request(image_path.read_bytes(), args.question, options)).original
        draw_overlay(image, result.roi_map, result.roi_box).save(args.overlay)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        box = f" box={list(result.roi_box)}" if result.roi_box else ""
        score = f" gate={result.gate_score:.3f}" if result.gate_score is not None else ""
        print(result.answer)
        print(f"[route={result.route}{score}{box} tokens={result.visual_tokens} "
              f"{result.timings_ms['total']:.0f} ms]", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from .serve.run import plan_local, serve_forever

    plan = plan_local(model=args.model, redis_url=args.redis_url, grpc_port=args.grpc_port, http_port=args.http_port,
                      host=args.host, config_path=args.config, device=args.device, dtype=args.dtype,
                      api_keys=args.api_key, api_key_file=args.api_key_file, metrics_port=args.metrics_port,
                      dashboard_port=args.dashboard_port, offline=args.offline)
    if args.offline:  # this process too: nothing here reaches for the hub
        os.environ["HF_HUB_OFFLINE"] = "1"
    serve_forever(plan)
    return 0


def cmd_bench(args) -> int:
    from .bench.runner import default_methods, run_bench
    from .engine import QZoomEngine
    from .model import load_for_config

    config = engine_config_from_args(args)
    engine = QZoomEngine(load_for_config(config), config)
    methods = default_methods(engine.loaded.factor, baseline_tokens=args.baseline_tokens,
                              coarse_tokens=args.coarse_tokens, gate_thresholds=args.gate_thresholds or (None,))
    report = run_bench(engine, split=args.split, n=args.n, seed=args.seed, methods=methods, out_dir=args.out,
                       max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(report["methods"]))
    else:
        print(f"{'method':<18} {'acc_fine':>8} {'acc_coarse':>10} {'tokens':>8} {'latency_ms':>10} {'skip':>6} {'roi_hit':>7}")
        for name, m in report["methods"].items():
            cells = [m["accuracy_fine"], m["accuracy_coarse"], m["mean_visual_tokens"], m["mean_latency_ms"],
                     m.get("gate_skip_rate_coarse"), m.get("roi_hit_rate_fine")]
            text = ["-" if v is None else f"{v:.3f}" if v <= 1 else f"{v:.0f}" for v in cells]
            print(f"{name:<18} {text[0]:>8} {text[1]:>10} {text[2]:>8} {text[3]:>10} {text[4]:>6} {text[5]:>7}")
    return 0


def cmd_synth(args) -> int:
    from .synthetic import generate, write_dataset

    samples = generate(args.split, args.n, args.seed, fine_fraction=args.fine_fraction, targets=args.targets)
    path = write_dataset(samples, args.out)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qzoom", description="Q-Zoom perception service")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    answer = sub.add_parser("answer", help="answer one question about one image, in-process")
    answer.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    answer.add_argument("--question", required=True)
    answer.add_argument("--json", action="store_true", help="print one JSON object")
    answer.add_argument("--overlay", help="write the image with the RoI heat map and box to this PNG")
    _engine_args(answer)
    _request_args(answer)
    answer.set_defaults(func=cmd_answer)

    serve = sub.add_parser("serve", help="start the gRPC service locally (Ray Serve) and print its address")
    serve.add_argument("--model", help="checkpoint directory or hub id; default: the embedded model")
    serve.add_argument("--redis-url", help="redis://host:6379/0 shares coarse features across replicas; "
                                           "default: an in-process cache per replica")
    serve.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu, or the config's)")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32, or the config's")
    serve.add_argument("--api-key", action="append", default=[],
                       help="require this API key (repeat for several); default: auth off")
    serve.add_argument("--api-key-file", help="file with API keys, comma- or line-separated")
    serve.add_argument("--grpc-port", type=int, help="default 9000 (or the config's)")
    serve.add_argument("--http-port", type=int, help="Ray Serve HTTP proxy port, default 8000 (or the config's)")
    serve.add_argument("--metrics-port", type=int, help="Ray's Prometheus exporter port (default: a free one, printed)")
    serve.add_argument("--dashboard-port", type=int,
                       help="Ray dashboard port, default 8265 (what `serve status` and `serve deploy` use)")
    serve.add_argument("--host", help="bind address of the HTTP proxy and the dashboard (default "
                                      "$QZOOM_SERVE_HOST, else 127.0.0.1); Ray's gRPC proxy binds every interface")
    serve.add_argument("--offline", action="store_true",
                       help="never contact the Hugging Face hub (as HF_HUB_OFFLINE=1): the model must be local or cached")
    serve.add_argument("--config", help="a Ray Serve config YAML, e.g. configs/serve-gpu.yaml")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="accuracy / tokens / latency on a synthetic set: baseline vs Q-Zoom")
    bench.add_argument("--split", choices=["hr", "doc"], default="hr")
    bench.add_argument("--n", type=int, default=40, help="number of samples")
    bench.add_argument("--seed", type=int, default=1000, help="any seed is a held-out set")
    bench.add_argument("--out", help="directory for results.json, pareto.png and RoI overlays")
    bench.add_argument("--json", action="store_true", help="print one summary object, per method")
    bench.add_argument("--baseline-tokens", type=int, nargs="+", default=[144, 576, 1024, 2304],
                       help="token budgets of the baseline (the largest is the full-resolution baseline)")
    bench.add_argument("--coarse-tokens", type=int, nargs="+", default=[144, 256], help="Q-Zoom coarse budgets")
    bench.add_argument("--gate-thresholds", type=float, nargs="+", help="default: the checkpoint's")
    bench.add_argument("--max-new-tokens", type=int, default=12, help="byte-level tokenizers spend one token per letter")
    _engine_args(bench)
    bench.set_defaults(func=cmd_bench)

    synth = sub.add_parser("synth", help="write a synthetic fine-grained dataset (JSONL + PNG) for training")
    synth.add_argument("--split", choices=["hr", "doc"], default="hr")
    synth.add_argument("--n", type=int, default=200)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--fine-fraction", type=float, default=0.5)
    synth.add_argument("--targets", choices=["dots", "marks", "glyphs"], default="dots",
                       help="small targets: coloured dots (the embedded model's task), shape marks or digits/letters")
    synth.add_argument("--out", required=True, help="directory for data.jsonl and images/")
    synth.set_defaults(func=cmd_synth)

    from .train.cli import add_train_subcommands

    add_train_subcommands(sub)
    try:  # `qzoom ask` / `qzoom zoom` come from the light client package (installed by scripts/install.sh)
        from qzoom_client.cli import add_client_subcommands
    except ImportError:
        log.debug("qzoom-client is not installed: no ask/zoom subcommands")
    else:
        add_client_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except QZoomError as e:
        print(f"qzoom {args.command}: {e.code}: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

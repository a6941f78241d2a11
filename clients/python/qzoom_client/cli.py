"""`qzoom ask` / `qzoom zoom` (also `qzoom-client ask|zoom`): call a running service from the shell."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from .client import QZoomClient, QZoomClientError

__all__ = ["add_client_subcommands", "main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", required=True, help="HOST:PORT of the gRPC service, e.g. localhost:9000")
    p.add_argument("--image", required=True, help="image file, or an image id returned by an upload")
    p.add_argument("--api-key", help="sent as 'authorization: Bearer <key>' (default: $QZOOM_API_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call (default 120)")
    p.add_argument("--json", action="store_true", help="print the response fields as one JSON object")


def _client(args) -> QZoomClient:
    return QZoomClient(args.addr, api_key=args.api_key or os.environ.get("QZOOM_API_KEY"), timeout=args.timeout)


def _reporting(command):
    """Errors exit 2 with `qzoom <cmd>: <STATUS>: <details>` (wherever the command is mounted)."""

    @functools.wraps(command)
    def run(args) -> int:
        try:
            return command(args)
        except QZoomClientError as e:
            print(f"qzoom {args.command}: {e.code}: {e.details}", file=sys.stderr)
            return 2

    return run


@_reporting
def cmd_ask(args) -> int:
    with _client(args) as client:
        result = client.answer(args.image, args.question, mode=args.mode)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.answer)
        gate = f" gate={result.gate_score:.3f}" if result.gate_score is not None else ""
        box = f" box={[round(v) for v in result.roi_box]}" if result.roi_box else ""
        print(f"[route={result.route}{gate}{box} tokens={result.visual_tokens} cache_hit={result.cache_hit}]",
              file=sys.stderr)
    return 0


@_reporting
def cmd_zoom(args) -> int:
    try:
        box = [float(v) for v in args.box.split(",")]
    except ValueError:
        raise QZoomClientError("INVALID_ARGUMENT", f"--box must be X1,Y1,X2,Y2 numbers; got {args.box!r}") from None
    with _client(args) as client:
        result = client.zoom_region(args.image, box, args.space, question=args.question)
    if args.out:
        with open(args.out, "wb") as f:
            f.write(result.crop_png)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        if result.answer is not None:
            print(result.answer)
        print(f"[crop {result.crop_width}x{result.crop_height} box={result.box['original']} "
              f"crop_id={result.crop_id}{' -> ' + args.out if args.out else ''}]", file=sys.stderr)
    return 0


def add_client_subcommands(sub) -> None:
    """Mount `ask` and `zoom` on an argparse subparsers object (the service's `qzoom` CLI uses this)."""
    ask = sub.add_parser("ask", help="ask a running service a question about an image")
    _common(ask)
    ask.add_argument("--question", required=True)
    ask.add_argument("--mode", choices=["auto", "direct", "zoom"], default="auto")
    ask.set_defaults(func=cmd_ask)
    zoom = sub.add_parser("zoom", help="crop a region through a running service, optionally asking about it")
    _common(zoom)
    zoom.add_argument("--box", required=True, help="X1,Y1,X2,Y2 in the --space coordinates")
    zoom.add_argument("--space", choices=["original", "input", "norm1000", "norm1"], default="original")
    zoom.add_argument("--question", help="ask about the region (zoomed re-decode)")
    zoom.add_argument("--out", help="write the crop PNG here")
    zoom.set_defaults(func=cmd_zoom)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qzoom-client", description="qzoom-service gRPC client")
    add_client_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

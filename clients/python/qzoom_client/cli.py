"""`qzoom-client ask|zoom|upload|health` (also mounted as `qzoom ask|zoom|upload|health`): call a running
service from the shell."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from . import __version__
from .client import QZoomClient, QZoomClientError

__all__ = ["add_client_subcommands", "main"]


def _common(p: argparse.ArgumentParser, image: str | None = "image file, or an image id returned by an upload"):
    """The flags every subcommand shares; `image`: the --image help text, None for no --image."""
    p.add_argument("--addr", required=True, help="HOST:PORT of the gRPC service, e.g. localhost:9000")
    if image:
        p.add_argument("--image", required=True, help=image)
    p.add_argument("--api-key", help="sent as 'authorization: Bearer <key>' (default: $QZOOM_API_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call (default 120)")
    p.add_argument("--json", action="store_true", help="print the response fields as one JSON object")


def _client(args) -> QZoomClient:
    return QZoomClient(args.addr, api_key=args.api_key or os.environ.get("QZOOM_API_KEY"), timeout=args.timeout)


def _reporting(command):
    """Errors exit 2 with `qzoom <cmd>: <STATUS>: <details>` on stderr (wherever the command is mounted),
    or under `--json` with `{"error": {"code": ..., "details": ...}}` on stdout."""

    @functools.wraps(command)
    def run(args) -> int:
        try:
            return command(args)
        except QZoomClientError as e:
            if args.json:
                print(json.dumps({"error": {"code": e.code, "details": e.details}}))
            else:
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


@_reporting
def cmd_upload(args) -> int:
    with _client(args) as client:
        result = client.upload_image(args.image)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.image_id)
        print(f"[{result.width}x{result.height} -> model input {result.input_width}x{result.input_height}"
              f"{' (already stored)' if result.already_stored else ''}]", file=sys.stderr)
    return 0


@_reporting
def cmd_health(args) -> int:
    """Exit 0 when the service is SERVING, 1 when it answers otherwise, 2 when it does not answer."""
    with _client(args) as client:
        status, detail = client.check(), client.health()
    if args.json:
        print(json.dumps({"status": status, **detail.to_json()}))
    else:
        print(status)
        print(f"[model {detail.model_id}, version {detail.version}, cache {detail.cache_backend} "
              f"{'reachable' if detail.cache_reachable else 'UNREACHABLE'}]", file=sys.stderr)
    return 0 if status == "SERVING" else 1


def add_client_subcommands(sub) -> None:
    """Mount `ask`, `zoom`, `upload` and `health` on an argparse subparsers object (the service's `qzoom`
    CLI uses this)."""
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
    upload = sub.add_parser("upload", help="store an image on a running service once; prints its image id")
    _common(upload, image="image file to upload")
    upload.set_defaults(func=cmd_upload)
    health = sub.add_parser("health", help="is a running service SERVING (grpc.health.v1), with its model and cache")
    _common(health, image=None)
    health.set_defaults(func=cmd_health)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qzoom-client", description="qzoom-service gRPC client")
    parser.add_argument("--version", action="version", version=f"qzoom-client {__version__}")
    add_client_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

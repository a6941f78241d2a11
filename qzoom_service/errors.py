"""Typed errors. Each carries the gRPC status name the ingress maps it to; the engine never imports grpc."""

from __future__ import annotations

__all__ = [
    "QZoomError",
    "InvalidInput",
    "ImageTooLarge",
    "NotFound",
    "CheckpointError",
    "Unavailable",
    "Unauthenticated",
    "LimitExceeded",
    "Overloaded",
]


class QZoomError(Exception):
    """Base class. `code` is a `grpc.StatusCode` name; the status details are `message`.

    `reason` is a short machine-readable tag per class; it is not sent to callers, logged or counted
    (the ingress sends `code` and `message`; metrics count by `code`), so nothing reads it today.
    """

    code = "INTERNAL"
    reason = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(QZoomError):
    """The request itself is wrong: unreadable image, empty question, bad threshold or budget."""

    code = "INVALID_ARGUMENT"
    reason = "invalid_input"


class ImageTooLarge(QZoomError):
    """The image exceeds the configured pixel or byte limit (decompression-bomb guard)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "image_too_large"


class NotFound(QZoomError):
    code = "NOT_FOUND"
    reason = "not_found"


class CheckpointError(QZoomError):
    """A checkpoint is missing keys, has mis-shaped tensors or inconsistent Q-Zoom config keys."""

    code = "FAILED_PRECONDITION"
    reason = "bad_checkpoint"


class Unavailable(QZoomError):
    """A backing store the request needs (the image store) is down; retrying later may work."""

    code = "UNAVAILABLE"
    reason = "unavailable"


class Unauthenticated(QZoomError):
    code = "UNAUTHENTICATED"
    reason = "unauthenticated"


class LimitExceeded(QZoomError):
    """A per-handle quota is used up (e.g. crops per image)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "limit_exceeded"


class Overloaded(QZoomError):
    """A pool the request needs is at capacity (e.g. the zoom deployment's queue is full); retry shortly."""

    code = "RESOURCE_EXHAUSTED"
    reason = "overloaded"

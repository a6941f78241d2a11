"""qzoom-client: a light gRPC client for qzoom-service (grpcio + protobuf, no torch)."""

from .client import (AnswerResult, AsyncQZoomClient, HealthResult, QZoomClient, QZoomClientError, UploadResult,
                     ZoomResult)

__all__ = ["QZoomClient", "AsyncQZoomClient", "QZoomClientError", "AnswerResult", "ZoomResult", "UploadResult",
           "HealthResult"]
__version__ = "0.1.0"

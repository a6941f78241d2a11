"""qzoom-service: Q-Zoom perception engine and service."""

__version__ = "0.1.0"

"""Benchmark and training-data generators for the Q-Zoom service."""

"""Shared fixtures: a tiny random Qwen2.5-VL with Q-Zoom branches, saved in the released layout and loaded
back through the real loading path, plus deterministic test images."""

from __future__ import annotations

import pytest

from qzoom_service.config import EngineConfig
from qzoom_service.engine import QZoomEngine
from qzoom_service.model import load_model
from qzoom_service.tiny import build_tiny, save_tiny

from .helpers import TINY_BUDGET


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    model, processor = build_tiny(seed=0)
    return save_tiny(model, processor, tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_checkpoint):
    return load_model(str(tiny_checkpoint))


@pytest.fixture(scope="session")
def engine(tiny_loaded):
    return QZoomEngine(tiny_loaded, EngineConfig(max_new_tokens=8, **TINY_BUDGET))

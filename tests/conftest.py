"""Shared fixtures: a tiny random Qwen2.5-VL with Q-Zoom branches, saved in the released layout and loaded
back through the real loading path, plus deterministic test images."""

from __future__ import annotations

import pytest

from qzoom_service.config import EngineConfig
from qzoom_service.engine import QZoomEngine
from qzoom_service.model import load_model
from qzoom_service.released import CONFIG_KEYS
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


@pytest.fixture(scope="session")
def plain_checkpoint(tmp_path_factory):
    """The tiny model saved as plain Qwen2.5-VL weights: no branch tensors, no Q-Zoom config keys."""
    import json

    from safetensors.torch import load_file, save_file

    model, processor = build_tiny(seed=0)
    ckpt = save_tiny(model, processor, tmp_path_factory.mktemp("plain") / "ckpt", layout="5.x")
    state = {k: v for k, v in load_file(ckpt / "model.safetensors").items() if "twig" not in k and "high_res" not in k}
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    for key in CONFIG_KEYS:
        cfg.pop(key, None)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def pytest_configure(config):
    from .serving import use_session_ray_auth

    use_session_ray_auth()  # before any test module imports ray: Ray reads its auth mode once, on import


@pytest.fixture(scope="session")
def qzoom_service(tmp_path_factory):
    """The session's one Ray cluster and real `qzoom serve` (see tests/serving.py), started on first use."""
    from .serving import shared_service

    with shared_service(tmp_path_factory.mktemp("qzoom-service")) as service:
        yield service

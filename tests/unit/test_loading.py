"""A checkpoint in the released key layout loads every branch weight; bad checkpoints fail naming the keys."""

from __future__ import annotations

import json
import pytest
import torch
from safetensors.torch import load_file, save_file

from qzoom_service.errors import CheckpointError
from qzoom_service.model import load_model
from qzoom_service.tiny import build_tiny, save_tiny


@pytest.fixture(scope="module")
def source():
    return build_tiny(seed=7)


def _assert_same_weights(model, loaded):
    ref = model.qzoom.state_dict()
    got = loaded.branches.state_dict()
    assert set(ref) == set(got) and len(ref) > 20
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    trunk = loaded.model.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("qzoom."):
            assert torch.equal(v, trunk[k]), k


@pytest.mark.parametrize("layout", ["4.51", "5.x"])
def test_released_layout_loads_every_branch_weight(tmp_path, source, layout):
    model, processor = source
    ckpt = save_tiny(model, processor, tmp_path / layout, layout=layout)
    keys = load_file(ckpt / "model.safetensors").keys()
    prefix = "model.twig_layers.0." if layout == "4.51" else "model.language_model.twig_layers.0."
    assert any(k.startswith(prefix) for k in keys)
    assert ("visual.patch_embed.proj.weight" in keys) == (layout == "4.51")
    assert not any("rpn_layers" in k or "gate_layers" in k or "gate_head" in k for k in keys)  # our names stay ours
    loaded = load_model(str(ckpt))
    _assert_same_weights(model, loaded)
    assert loaded.branches.branch_layer == 2 and loaded.branches.rpn_depth == 2
    assert loaded.branches.gate_depth == 1 and loaded.checkpoint.reuse_src_pos is True


def test_sharded_checkpoint_with_index_loads(tmp_path, source):
    model, processor = source
    ckpt = save_tiny(model, processor, tmp_path / "sharded")
    state = load_file(ckpt / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, ckpt / shard, metadata={"format": "pt"})
    (ckpt / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same_weights(model, load_model(str(ckpt)))


def _rewrite(ckpt, edit):
    state = load_file(ckpt / "model.safetensors")
    edit(state)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_missing_branch_key_fails_naming_it(tmp_path, source):
    ckpt = save_tiny(*source, tmp_path / "missing")
    _rewrite(ckpt, lambda s: s.pop("model.twig_layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: twig_layers\.1\.self_attn\.k_proj\.bias"):
        load_model(str(ckpt))


def test_misshaped_branch_key_fails_naming_it(tmp_path, source):
    ckpt = save_tiny(*source, tmp_path / "shape")
    _rewrite(ckpt, lambda s: s.__setitem__("model.high_res_head.weight", torch.zeros(2, 64)))
    with pytest.raises(CheckpointError, match=r"high_res_head\.weight: checkpoint \(2, 64\) vs model \(1, 64\)"):
        load_model(str(ckpt))


def test_config_keys_are_read_and_overridable(tmp_path, source):
    ckpt = save_tiny(*source, tmp_path / "cfg")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(reuse_src_pos=False, high_res_thresh=0.37)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(ckpt))
    assert loaded.checkpoint.reuse_src_pos is False and loaded.checkpoint.gate_threshold == pytest.approx(0.37)
    assert load_model(str(ckpt), overrides={"reuse_src_pos": True}).checkpoint.reuse_src_pos is True
    with pytest.raises(CheckpointError, match="unexpected keys: twig_layers.1"):
        load_model(str(ckpt), overrides={"rpn_depth": 1})
    with pytest.raises(CheckpointError, match="unknown checkpoint config overrides: twig_T"):
        load_model(str(ckpt), overrides={"twig_T": 1})  # released names are not ours


def test_checkpoint_serving_defaults_fill_an_unset_engine_config(tmp_path, source):
    """OUR config.json keys: the coarse budget and RoI threshold a checkpoint was trained for."""
    from qzoom_service.config import EngineConfig
    from qzoom_service.engine import QZoomEngine

    ckpt = save_tiny(*source, tmp_path / "defaults")
    cfg = json.loads((ckpt / "config.json").read_text())
    token = 28 * 28  # the tiny model's pixels per merged token
    cfg.update(coarse_min_pixels=100 * token, coarse_max_pixels=121 * token, roi_thresh=0.27)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(ckpt))
    assert loaded.factor**2 == token and loaded.checkpoint.roi_threshold == pytest.approx(0.27)
    engine = QZoomEngine(loaded)
    assert (engine.config.min_pixels, engine.config.max_pixels) == (100 * token, 121 * token)
    assert engine.config.roi_threshold == pytest.approx(0.27)
    assert engine.config.gate_threshold == pytest.approx(0.1) and engine.config.reuse_src_pos is True
    explicit = QZoomEngine(loaded, EngineConfig(min_pixels=64 * token, max_pixels=81 * token, roi_threshold=0.5,
                                                reuse_src_pos=False))
    assert (explicit.config.min_pixels, explicit.config.max_pixels) == (64 * token, 81 * token)
    assert explicit.config.roi_threshold == 0.5 and explicit.config.reuse_src_pos is False
    plain = QZoomEngine(load_model(str(save_tiny(*source, tmp_path / "none"))))
    assert (plain.config.min_pixels, plain.config.max_pixels) == (256 * token, 576 * token)


def test_plain_qwen_weights_load_without_branches(plain_checkpoint):
    loaded = load_model(str(plain_checkpoint))
    assert not loaded.branches.has_rpn and not loaded.branches.has_gate
    assert loaded.branch_layer == loaded.model.config.text_config.num_hidden_layers // 2


def test_missing_branch_key_in_the_5x_layout_fails_naming_it(tmp_path, source):
    ckpt = save_tiny(*source, tmp_path / "missing5", layout="5.x")
    _rewrite(ckpt, lambda s: s.pop("model.language_model.high_res_layers.0.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: high_res_layers\.0\.mlp\.up_proj\.weight"):
        load_model(str(ckpt))

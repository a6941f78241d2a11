"""The released checkpoint format lives in released.py: tensor names and config.json keys round-trip in both
layouts, and no other module knows the released names."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qzoom_service import released
from qzoom_service.errors import CheckpointError
from qzoom_service.released import CheckpointConfig, config_json_keys, read_config
from qzoom_service.tiny import build_tiny

PACKAGE = Path(released.__file__).parent
ASSET = PACKAGE / "assets" / "qzoom-synth-tiny" / "config.json"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=3)


@pytest.mark.parametrize("layout,branch_prefix,trunk_keys", [
    ("4.51", "model.", ("visual.patch_embed.proj.weight", "model.layers.0.mlp.up_proj.weight")),
    ("5.x", "model.language_model.", ("model.visual.patch_embed.proj.weight",
                                      "model.language_model.layers.0.mlp.up_proj.weight")),
])
def test_tensor_names_round_trip_in_both_layouts(tmp_path, tiny, layout, branch_prefix, trunk_keys):
    model, _ = tiny
    state = released.released_state(model, model.qzoom, layout)
    assert all(k in state for k in trunk_keys) and "lm_head.weight" in state
    assert not any(k.startswith("qzoom.") for k in state)  # the attached branches are saved once, by name
    assert f"{branch_prefix}twig_layers.1.self_attn.q_proj.weight" in state
    assert f"{branch_prefix}high_res_head.weight" in state
    save_file(state, tmp_path / "model.safetensors")
    back = released.branch_state_from_shards([tmp_path / "model.safetensors"])
    ours = model.qzoom.state_dict()
    assert set(back) == set(ours) and "gate_head.weight" in back and "rpn_layers.0.mlp.up_proj.weight" in back
    for name, tensor in ours.items():
        assert torch.equal(back[name], tensor), name


def test_a_branch_tensor_present_under_two_prefixes_is_refused(tmp_path):
    w = torch.zeros(1, 4)
    save_file({"model.high_res_head.weight": w, "model.language_model.high_res_head.weight": w.clone()},
              tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="gate_head.weight appears twice"):
        released.branch_state_from_shards([tmp_path / "model.safetensors"])


@pytest.mark.parametrize("config", [
    CheckpointConfig(has_rpn=True, branch_layer=3, rpn_depth=2, has_gate=True, gate_depth=1, gate_threshold=0.35,
                     reuse_src_pos=True, roi_threshold=0.2, min_pixels=100 * 784, max_pixels=200 * 784),
    # without a gate, high_res_T is not written and reads back as twig_T (the released convention)
    CheckpointConfig(has_rpn=True, branch_layer=2, rpn_depth=3, gate_depth=3),
    CheckpointConfig(gate_depth=0),
])
def test_config_keys_round_trip(config):
    keys = config_json_keys(config)
    assert read_config(json.loads(json.dumps(keys))) == config
    if not config.has_gate:
        assert not {"high_res_K", "high_res_T", "high_res_thresh"} & set(keys)


def test_the_shipped_model_config_reads_as_before():
    config = read_config(json.loads(ASSET.read_text()))
    assert config == CheckpointConfig(has_rpn=True, branch_layer=2, rpn_depth=2, has_gate=True, gate_depth=1,
                                      gate_threshold=0.4, reuse_src_pos=True, roi_threshold=0.2,
                                      min_pixels=112896, max_pixels=112896)


def test_absent_keys_take_the_released_defaults_and_nested_keys_are_read():
    config = read_config({"text_config": {"enable_twig": True, "twig_K": 5, "twig_T": 3}})
    assert (config.branch_layer, config.rpn_depth, config.gate_depth) == (5, 3, 3)  # high_res_T defaults to twig_T
    assert config.gate_threshold == released.DEFAULT_GATE_THRESHOLD == 0.1 and config.reuse_src_pos is False


def test_unequal_branch_layers_are_refused_naming_both_keys():
    with pytest.raises(CheckpointError, match=r"twig_K \(2\) and high_res_K \(3\) must be equal"):
        read_config({"enable_twig": True, "twig_K": 2, "twig_T": 1, "enable_high_res": True, "high_res_K": 3})


def test_writing_replaces_every_stale_copy_of_a_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"twig_K": 9, "hidden": 1, "text_config": {"high_res_thresh": 0.9, "x": 2}}))
    released.write_config_keys(path, CheckpointConfig(has_rpn=True, branch_layer=2, rpn_depth=1, gate_depth=0))
    raw = json.loads(path.read_text())
    assert raw["twig_K"] == 2 and raw["hidden"] == 1 and raw["text_config"] == {"x": 2}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            names.add(node.module or "")
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").removeprefix("qzoom_service."))
    return names


def test_tiny_and_released_do_not_import_the_loader():
    assert "model" not in _imported_modules(PACKAGE / "tiny.py")
    assert not {"model", "tiny"} & _imported_modules(PACKAGE / "released.py")


def test_no_other_module_spells_the_released_tensor_names():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "released.py" and "_proto" not in p.parts
                 and any(n in p.read_text() for n in ('"twig_layers', '"high_res_layers', '"high_res_head'))]
    assert offenders == []

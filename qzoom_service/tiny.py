"""Tiny, randomly initialised Qwen2.5-VL models with Q-Zoom branches, built entirely in code.

Used by tests and as the development default: no file from any hub is needed. The tokenizer is a
byte-level BPE without merges (every UTF-8 byte is a token) plus the Qwen2.5-VL special tokens, and the
chat template reproduces the Qwen2.5-VL layout with the default system prompt. `save_tiny` writes the
released Q-Zoom checkpoint layout (`released.save_released`) so the real loading path is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .heads import QZoomBranches
from .preprocess import Processor
from .released import CheckpointConfig, config_json_keys, read_config, save_released

__all__ = ["TinySpec", "build_tiny", "save_tiny", "tiny_checkpoint_config", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

_PATCH, _MERGE = 14, 2  # Qwen2.5-VL's vision geometry, which the tiny models copy

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Same rendered layout as the Qwen2.5-VL template: default system prompt, images as
# <|vision_start|><|image_pad|><|vision_end|> inside the user turn, generation prompt on request.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. Defaults give ~0.3 M parameters and run in milliseconds on a CPU."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    branch_layer: int = 2
    rpn_depth: int = 2
    gate_depth: int = 1
    reuse_src_pos: bool = True
    initializer_range: float = 0.2
    rope_theta: float = 100.0
    repetition_penalty: float = 1.05
    patch_size: int = _PATCH
    merge_size: int = _MERGE
    min_pixels: int = 64 * (_PATCH * _MERGE) ** 2  # image processor budget: 64..144 merged tokens
    max_pixels: int = 144 * (_PATCH * _MERGE) ** 2


def _build_tokenizer() -> PreTrainedTokenizerFast:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        padding_side="left",
    )


def _mrope_section(head_dim: int) -> list[int]:
    # Split head_dim/2 rotary frequencies over (t, h, w) in the 16:24:24 ratio of the real models.
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_tiny(seed: int = 0, spec: TinySpec = TinySpec()):
    """Return (model, processor) with branches attached as `model.qzoom` (a `QZoomBranches`).

    Deterministic from `seed`: the same seed gives bit-identical weights.
    """
    tokenizer = _build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_attention_heads
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=32768,
            # Larger init and a short rope base make attention peaked and position-sensitive, so tests
            # that compare position schemes or masks can actually fail on a random model.
            initializer_range=spec.initializer_range,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                             "mrope_section": _mrope_section(head_dim)},
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=2 * spec.vision_hidden_size,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            patch_size=spec.patch_size,
            spatial_merge_size=spec.merge_size,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[spec.vision_depth - 1],
            initializer_range=spec.initializer_range,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    # The released config.json keys travel on the config, as they do for a loaded checkpoint.
    for key, value in config_json_keys(tiny_checkpoint_config(spec)).items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        branches = QZoomBranches.create(
            config.text_config,
            branch_layer=spec.branch_layer,
            rpn_depth=spec.rpn_depth,
            gate_depth=spec.gate_depth,
        )
        # Initialise branch layers from the trunk, as stage 1 does, then perturb so tests can tell them apart.
        branches.init_from_trunk(model.model.language_model.layers)
        for p in branches.parameters():
            p.data.add_(0.02 * torch.randn_like(p))
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        repetition_penalty=spec.repetition_penalty,
        do_sample=False,
    )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=2,
    )
    processor = Processor(tokenizer=tokenizer, image_processor=image_processor, chat_template=CHAT_TEMPLATE)
    model.qzoom = branches.eval()
    return model, processor


def tiny_checkpoint_config(spec: TinySpec) -> CheckpointConfig:
    """The Q-Zoom settings of a tiny model of this shape (default thresholds)."""
    return CheckpointConfig(has_rpn=True, branch_layer=spec.branch_layer, rpn_depth=spec.rpn_depth,
                            has_gate=True, gate_depth=spec.gate_depth, reuse_src_pos=spec.reuse_src_pos)


def save_tiny(model, processor, out_dir: str | Path, *, layout: str = "4.51") -> Path:
    """Write a `build_tiny` model (branches in `model.qzoom`) as a released Q-Zoom checkpoint directory.

    `layout="4.51"`: the transformers 4.51.3 names of the released checkpoints (`visual.*`,
    `model.layers.*`, `model.twig_layers.*`, ...); `"5.x"`: the 5.x prefixes.
    """
    return save_released(model, processor, model.qzoom, read_config(model.config.to_dict()), out_dir, layout=layout)

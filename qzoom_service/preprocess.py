"""Stage 0: validate the request, decode the image, build the chat prompt and the coarse pixel input.

The prompt is the checkpoint's own chat template (default system prompt) applied to `[image, question]`;
nothing is appended unless `prompt_suffix` asks for it. Images go through the same two resizes as the
reference evaluator: a qwen-vl-utils style pre-resize (round to multiples of the merged-token side
`factor`, 28 px on Qwen2.5-VL, bicubic) and then the image processor's `smart_resize` to the requested
pixel budget. The factor is the checkpoint's own (`Processor.factor`), never assumed.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from qzoom_client.coords import preresize_bounds, smart_resize
from transformers import AutoImageProcessor, AutoTokenizer

from .config import EngineConfig, RequestOptions, check_visual_budget
from .errors import ImageTooLarge, InvalidInput, LimitExceeded
from .geometry import MAX_ASPECT_RATIO
from .types import Prepared, Request

__all__ = ["Processor", "prepare", "load_image", "resolve_options", "preresize", "without_upscale"]

# No tokenizer's vocabulary averages more bytes per token over a long text (Qwen2's longest pieces are
# whitespace runs); longer texts are refused before tokenizing them.
_MAX_BYTES_PER_TOKEN = 32


@dataclass
class Processor:
    """Tokenizer + image processor + chat template of one checkpoint (no video processor needed)."""

    tokenizer: object
    image_processor: object
    chat_template: str

    @classmethod
    def load(cls, path: str) -> "Processor":
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
        return cls(tokenizer, image_processor, _read_chat_template(path, tokenizer))

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        (out / "chat_template.jinja").write_text(self.chat_template)

    @property
    def patch_size(self) -> int:
        return self.image_processor.patch_size

    @property
    def merge_size(self) -> int:
        return self.image_processor.merge_size

    @property
    def factor(self) -> int:
        """Pixels per side of the model-input square one merged visual token covers (28 on Qwen2.5-VL)."""
        return self.patch_size * self.merge_size

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    def prompt_text(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def encode_image(self, image: Image.Image, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pixel_values (patches, C*t*p*p), grid_thw (1, 3)) at the given pixel budget."""
        out = self.image_processor(
            images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="pt"
        )
        return out["pixel_values"], out["image_grid_thw"]

    def prompt_ids(self, question: str, num_image_tokens: int) -> torch.Tensor:
        """Token ids (1, L) of the chat prompt with the image placeholder expanded to Nv tokens."""
        pad = "<|image_pad|>"
        text = self.prompt_text(question)
        if text.count(pad) != 1:
            raise InvalidInput(f"the chat template must render exactly one {pad}; got {text.count(pad)}")
        text = text.replace(pad, pad * num_image_tokens)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.long()


def _read_chat_template(path: str, tokenizer) -> str:
    local = Path(path)
    if (local / "chat_template.jinja").is_file():
        return (local / "chat_template.jinja").read_text()
    if (local / "chat_template.json").is_file():
        return json.loads((local / "chat_template.json").read_text())["chat_template"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if not local.exists():
        # Hub id: the template ships with the processor files.
        from huggingface_hub import hf_hub_download

        for name in ("chat_template.jinja", "chat_template.json"):
            try:
                text = Path(hf_hub_download(path, name)).read_text()
            except Exception:  # noqa: BLE001 - try the next file name
                continue
            return text if name.endswith(".jinja") else json.loads(text)["chat_template"]
    raise InvalidInput(f"no chat template found for {path}")


def load_image(data: Image.Image | bytes, config: EngineConfig, factor: int) -> Image.Image:
    """Decode and validate an image; returns an RGB PIL image. Raises before any model work.

    `factor`: the model's pixels per merged token side, for the aspect-ratio limit on the resized grid."""
    if isinstance(data, Image.Image):
        image = data
        _check_pixels(image.width, image.height, config)
    else:
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise InvalidInput("image is empty: send the encoded bytes of a PNG, JPEG, WebP, ... file")
        if len(data) > config.max_image_bytes:
            raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {config.max_image_bytes}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(bytes(data)))
                _check_pixels(image.width, image.height, config)
                image.load()
        except (ImageTooLarge, InvalidInput):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLarge(f"image rejected as a decompression bomb: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InvalidInput(f"image bytes are not a readable image (truncated or corrupt?): {e}") from None
    if image.width < 1 or image.height < 1:
        raise InvalidInput(f"image has zero size ({image.width}x{image.height})")
    _check_aspect_ratio(image.width, image.height, factor)
    return image.convert("RGB")


def _check_pixels(width: int, height: int, config: EngineConfig) -> None:
    if width < 1 or height < 1:
        raise InvalidInput(f"image has zero size ({width}x{height})")
    if width * height > config.max_image_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {config.max_image_pixels}"
        )


def _check_aspect_ratio(width: int, height: int, factor: int) -> None:
    # The image processor refuses a ratio over MAX_ASPECT_RATIO after the pre-resize has rounded both sides to
    # the grid (a 30 px side becomes 28), so that is the ratio to check; it raises a bare ValueError otherwise.
    h, w = smart_resize(height, width, *preresize_bounds(factor), factor)
    ratio = max(h, w) / min(h, w)
    if ratio > MAX_ASPECT_RATIO:
        raise InvalidInput(
            f"image is {width}x{height}: an aspect ratio of {ratio:.0f} once resized to the {factor}-px grid, over "
            f"the model's limit of {MAX_ASPECT_RATIO}; crop or pad it to a less elongated shape"
        )


def resolve_options(options: RequestOptions, config: EngineConfig, factor: int) -> RequestOptions:
    """Fill every `None` from the (resolved) engine config; validate the result against the model's `factor`."""
    options.validate(factor)
    lo = options.min_pixels or config.min_pixels
    hi = options.max_pixels or config.max_pixels
    zlo = options.zoom_min_pixels or config.zoom_min_pixels or lo
    zhi = options.zoom_max_pixels or config.zoom_max_pixels or hi
    filled = replace(
        options,
        gate_threshold=config.gate_threshold if options.gate_threshold is None else options.gate_threshold,
        roi_threshold=config.roi_threshold if options.roi_threshold is None else options.roi_threshold,
        min_pixels=min(lo, hi),
        max_pixels=hi,
        zoom_min_pixels=min(zlo, zhi),
        zoom_max_pixels=zhi,
        max_new_tokens=options.max_new_tokens or config.max_new_tokens,
    )
    check_visual_budget(filled, config, factor)
    return filled.validate(factor)


def without_upscale(options: RequestOptions, config: EngineConfig, image_pixels: int) -> RequestOptions:
    """Lower minimum budgets above both the image's own pixels and this engine's minimums (`allow_upscale` off).

    A small image asked at a large minimum would be enlarged to it: tokens that show nothing new. The engine's
    own minimums stay allowed, so a default request is resized exactly as the reference does."""
    if config.allow_upscale:
        return options
    lo = min(options.min_pixels, max(image_pixels, config.min_pixels))
    zlo = min(options.zoom_min_pixels, max(image_pixels, config.zoom_min_pixels or config.min_pixels))
    return replace(options, min_pixels=lo, zoom_min_pixels=zlo)


def check_prompt_tokens(text: str, processor: Processor, config: EngineConfig) -> None:
    """Refuse question + prompt_suffix over `max_prompt_tokens` tokens (the prefill's cost grows with them)."""
    limit = config.max_prompt_tokens
    nbytes = len(text.encode("utf-8", "surrogatepass"))
    if nbytes > limit * _MAX_BYTES_PER_TOKEN:  # too long to be worth tokenizing
        raise LimitExceeded(f"question + prompt_suffix is {nbytes} bytes, over any {limit} tokens; the server's "
                            f"max_prompt_tokens is {limit}")
    count = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    if count > limit:
        raise LimitExceeded(f"question + prompt_suffix is {count} tokens; the server's max_prompt_tokens is {limit}")


def preresize(image: Image.Image, factor: int) -> Image.Image:
    """qwen-vl-utils style resize the reference applies before the processor (bicubic, multiples of `factor`)."""
    h, w = smart_resize(image.height, image.width, *preresize_bounds(factor), factor)
    if (w, h) == image.size:
        return image
    return image.resize((w, h), Image.Resampling.BICUBIC)


def prepare(request: Request, processor: Processor, config: EngineConfig) -> Prepared:
    """`config` must be resolved against the model (`LoadedModel.resolve`): no setting left `None`."""
    question = request.question
    if not isinstance(question, str) or not question.strip():
        raise InvalidInput("question is empty")
    if len(question) > config.max_question_chars:
        raise InvalidInput(f"question has {len(question)} characters; the limit is {config.max_question_chars}")
    check_prompt_tokens(question + request.options.prompt_suffix, processor, config)
    options = resolve_options(request.options, config, processor.factor)
    original = load_image(request.image, config, processor.factor)
    options = without_upscale(options, config, original.width * original.height)
    pixel_values, grid = processor.encode_image(preresize(original, processor.factor), options.min_pixels,
                                                options.max_pixels)
    num_visual = int(grid[0].prod()) // (processor.merge_size**2)
    input_ids = processor.prompt_ids(question + options.prompt_suffix, num_visual)
    return Prepared(original=original, input_ids=input_ids, pixel_values=pixel_values, grid_thw=grid,
                    options=options, patch_size=processor.patch_size, merge_size=processor.merge_size,
                    image_id=request.image_id)

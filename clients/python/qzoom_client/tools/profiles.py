"""Tool profiles: the zoom tool as each agent family was trained to call it, mapped onto ZoomRegion.

A profile is a JSON Schema (`schemas/<name>.json`, shared by every integration) plus a rule that turns
validated arguments into a `Target`: which image of the conversation the box is relative to, and the
service coordinate space it is in. The server maps the box back to original pixels (composing crops).

| profile        | tool name             | box space                           | image reference                      |
|----------------|-----------------------|-------------------------------------|--------------------------------------|
| generic        | zoom_region           | coord_space: norm1000, norm1, pixel | image_id + source (crop_id)          |
| deepeyes       | image_zoom_in_tool    | pixels of the image the model saw   | always the first image               |
| qwen3vl        | image_zoom_in_tool    | 0-1000                              | img_idx, 0-based, crops included     |
| pixel_reasoner | crop_image_normalized | 0-1 (+0.1 context on each side)     | target_image, 1-based, 1 = original  |
| mini_o3        | grounding (text tag)  | 0-1                                 | source: original_image/observation_k |
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import jsonschema

from .errors import ToolError

__all__ = ["PROFILES", "Observation", "Target", "tool_definition", "validate_arguments", "resolve", "plan_zoom"]

PROFILES = ("generic", "deepeyes", "qwen3vl", "pixel_reasoner", "mini_o3")
PIXEL_REASONER_PAD = 0.1  # fraction of the target image added on each side, as Pixel-Reasoner's executor does
_OBSERVATION = re.compile(r"^observation_(\d+)$")


@dataclass(frozen=True)
class Observation:
    """One image of the conversation: an uploaded original or a crop returned by the service."""

    index: int  # position in the conversation's image list, 0-based
    image_id: str  # the original image's handle (crops keep their original's)
    crop_id: str | None  # None for an original
    width: int  # pixels of this image (a crop's pixels equal original pixels: crops are not resized)
    height: int
    box: tuple[float, float, float, float] | None = None  # a crop's box in original pixels
    label: str = ""
    shown_size: tuple[int, int] | None = None  # (w, h) the model saw, when it was shown a resized copy


@dataclass(frozen=True)
class Target:
    """What one zoom call asks the service for."""

    source: Observation  # the image the box is relative to
    box: tuple[float, float, float, float]
    space: str  # a service space: original, norm1000 or norm1 (relative to `source`)
    label: str = ""
    question: str = ""


@cache
def tool_definition(name: str) -> dict:
    """{"name", "description", "parameters"} of a profile (or "answer", "upload_image"), as in schemas/."""
    if name not in PROFILES + ("answer", "upload_image"):
        raise ValueError(f"unknown tool profile {name!r}; use one of {', '.join(PROFILES)}")
    return json.loads(resources.files(__package__).joinpath("schemas", f"{name}.json").read_text())


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(tool_definition(name)["parameters"])


def validate_arguments(name: str, arguments: dict) -> None:
    """Raise a ToolError naming every problem (key path and what was expected) so the model can fix them."""
    tool = tool_definition(name)["name"]
    if not isinstance(arguments, dict):
        raise ToolError(f"the arguments of {tool} must be a JSON object; got {type(arguments).__name__}")
    problems = sorted(_validator(name).iter_errors(arguments), key=lambda e: list(e.absolute_path))
    if problems:
        text = "; ".join(_describe(e) for e in problems)
        raise ToolError(f"invalid arguments for {tool}: {text}. Expected: {_signature(name)}")


def _describe(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return f"{path}: {error.message}" if path else error.message


def _signature(name: str) -> str:
    params = tool_definition(name)["parameters"]
    required = params.get("required", [])
    keys = [k if k in required else f"{k}?" for k in params["properties"]]
    return f"{tool_definition(name)['name']}({', '.join(keys)})"


# -- arguments -> Target ----------------------------------------------------------------------------

def plan_zoom(profile: str, name: str, arguments: dict, images: list[Observation]) -> Target:
    """A call of the profile's zoom tool -> Target, everything short of asking the service."""
    tool = tool_definition(profile)["name"]
    if name != tool:
        raise ToolError(f"unknown tool {name!r}; the tools are {tool} and answer")
    validate_arguments(profile, arguments)
    return resolve(profile, arguments, images)


def resolve(profile: str, arguments: dict, images: list[Observation]) -> Target:
    """Validated arguments + the conversation's images -> Target. Raises ToolError for a bad reference."""
    return _RESOLVERS[profile](arguments, images)


def _at(images: list[Observation], index: int, what: str) -> Observation:
    if not images:
        raise ToolError("there is no image in this conversation yet; upload one first")
    if not 0 <= index < len(images):
        raise ToolError(f"{what} is out of range: the conversation has {len(images)} image(s) "
                        f"({_range_text(what, len(images))})")
    return images[index]


def _range_text(what: str, n: int) -> str:
    if what.startswith("target_image"):
        return f"target_image 1..{n}"
    if what.startswith("source"):
        return "original_image" + {1: "", 2: " or observation_1"}.get(n, f" or observation_1..observation_{n - 1}")
    return f"img_idx 0..{n - 1}"


def _generic(args: dict, images: list[Observation]) -> Target:
    image_id, source = args["image_id"], args.get("source") or "original"
    matches = [o for o in images if o.image_id == image_id
               and (o.crop_id is None if source == "original" else o.crop_id == source)]
    if not matches:
        known = sorted({o.image_id for o in images})
        if image_id not in known:
            raise ToolError(f"unknown image_id {image_id!r}; upload the image first"
                            + (f" (images in this conversation: {', '.join(known)})" if known else ""))
        crops = [o.crop_id for o in images if o.image_id == image_id and o.crop_id]
        raise ToolError(f"unknown source {source!r} for image {image_id}: use 'original' or one of its crop_ids "
                        f"({', '.join(crops) or 'none yet'})")
    space = {"norm1000": "norm1000", "norm1": "norm1", "pixel": "original"}[args.get("coord_space", "norm1000")]
    return Target(matches[0], tuple(args["bbox"]), space, args.get("label", ""), args.get("question", ""))


def _deepeyes(args: dict, images: list[Observation]) -> Target:
    # DeepEyes and Chain-of-Focus always crop the question image, in pixels of the copy the model saw.
    source = _at(images, 0, "the question image")
    box = tuple(args["bbox_2d"])
    if source.shown_size is None:
        return Target(source, box, "original", args.get("label", ""))
    w, h = source.shown_size
    return Target(source, (box[0] / w, box[1] / h, box[2] / w, box[3] / h), "norm1", args.get("label", ""))


def _qwen3vl(args: dict, images: list[Observation]) -> Target:
    source = _at(images, int(args["img_idx"]), f"img_idx {args['img_idx']}")
    return Target(source, tuple(args["bbox_2d"]), "norm1000", args.get("label", ""))


def _pixel_reasoner(args: dict, images: list[Observation]) -> Target:
    index = int(args["target_image"])
    source = _at(images, index - 1, f"target_image {index}")
    box = [float(v) for v in args["bbox_2d"]]
    if box[2] <= box[0] or box[3] <= box[1]:  # checked here: the padding would turn it into a valid box
        raise ToolError(f"box is empty or inverted: need x1 < x2 and y1 < y2; got {box}")
    if any(v > 1 for v in box):  # Pixel-Reasoner reads any value above 1 as pixels of the target
        box = [box[0] / source.width, box[1] / source.height, box[2] / source.width, box[3] / source.height]
    if box[0] >= 1 or box[1] >= 1 or box[2] <= 0 or box[3] <= 0:  # the clamped padding would hide this too
        raise ToolError(f"box {[round(v, 4) for v in box]} lies outside the target image; bbox_2d values are "
                        "fractions 0-1 of its width and height")
    return Target(source, pad_norm1(box, PIXEL_REASONER_PAD), "norm1")


def pad_norm1(box, pad: float) -> tuple[float, float, float, float]:
    """Widen a 0-1 box by `pad` on each side, clamped to [0, 1].

    Rounded to 1e-9 so that 0.6 - 0.1 is 0.5, not 0.4999...: the server truncates the top-left corner
    to whole pixels and would otherwise lose one.
    """
    x1, y1, x2, y2 = (round(v, 9) for v in (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad))
    return max(0.0, x1), max(0.0, y1), min(1.0, x2), min(1.0, y2)


def _mini_o3(args: dict, images: list[Observation]) -> Target:
    source = args["source"]
    index = 0 if source == "original_image" else int(_OBSERVATION.match(source).group(1))
    return Target(_at(images, index, f"source {source}"), tuple(args["bbox_2d"]), "norm1")


_RESOLVERS = {"generic": _generic, "deepeyes": _deepeyes, "qwen3vl": _qwen3vl, "pixel_reasoner": _pixel_reasoner,
              "mini_o3": _mini_o3}

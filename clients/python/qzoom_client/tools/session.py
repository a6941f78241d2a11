"""ToolSession: one conversation's images (originals and crops) and the tool calls made on them.

The session resolves a profile's image reference (img_idx, target_image, source, image_id) to the
service's image_id / crop_id, sends the box in the profile's space and lets the server map it back to
original pixels. Every failure — malformed arguments, a bad reference, a service error — raises a
ToolError whose `text` a model can read; the session's state is unchanged by a failed call.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field

from ..client import QZoomClient, QZoomClientError, UploadResult
from .errors import ToolError
from .parsers import ToolCall, parse_arguments, parse_grounding, parse_tool_calls
from .profiles import PROFILES, Observation, Target, plan_zoom, tool_definition, validate_arguments

__all__ = ["ToolSession", "ToolResult"]


@dataclass(frozen=True)
class ToolResult:
    """What a successful call returns: `text` for the model, the crop as PNG, and structured `data`."""

    text: str
    png: bytes | None = None
    observation: Observation | None = None
    data: dict = field(default_factory=dict)

    def data_url(self) -> str | None:
        return None if self.png is None else "data:image/png;base64," + base64.b64encode(self.png).decode()


class ToolSession:
    """A conversation's images and tool calls against one service (a `QZoomClient`).

    `profile` picks the zoom tool's schema and image reference (see `profiles.py`); an `answer` tool
    (the service's own coarse -> gate -> zoom path) is available in every profile. `answer_options`
    (mode, max_new_tokens, gate_threshold, ...) apply to every question the session sends.
    """

    def __init__(self, client: QZoomClient, profile: str = "generic", **answer_options):
        if profile not in PROFILES:
            raise ValueError(f"unknown tool profile {profile!r}; use one of {', '.join(PROFILES)}")
        self.client, self.profile, self.answer_options = client, profile, answer_options
        self._images: list[Observation] = []
        self._lock = threading.Lock()  # MCP and thread-pool callers may share a session

    @property
    def images(self) -> list[Observation]:
        return list(self._images)

    @property
    def tool_name(self) -> str:
        return tool_definition(self.profile)["name"]

    def tool_definitions(self, answer: bool = True) -> list[dict]:
        """The zoom tool (and the answer tool) as {"name", "description", "parameters"}."""
        return [tool_definition(self.profile)] + ([tool_definition("answer")] if answer else [])

    # -- images -------------------------------------------------------------------------------------

    def add_image(self, image, shown_size: tuple[int, int] | None = None) -> Observation:
        """Upload an image (bytes or a file path) and append it to the conversation.

        `shown_size`: (width, height) of the resized copy the model was shown, when the model's pixel
        boxes refer to that copy (the deepeyes profile then rescales them).
        """
        try:
            up: UploadResult = self.client.upload_image(image)
        except QZoomClientError as e:
            raise ToolError(e.details, e.code) from None
        with self._lock:
            obs = Observation(len(self._images), up.image_id, None, up.width, up.height,
                              shown_size=tuple(shown_size) if shown_size else None)
            self._images.append(obs)
        return obs

    # -- calls --------------------------------------------------------------------------------------

    def call(self, name: str, arguments) -> ToolResult:
        """Run one tool call by name; `arguments` is a dict or its JSON text."""
        arguments = parse_arguments(name, arguments)
        if name == "answer":
            validate_arguments("answer", arguments)
            return self.answer(arguments["question"], arguments.get("image_id"))
        return self._zoom(plan_zoom(self.profile, name, arguments, self._images))

    def call_text(self, text: str) -> list[ToolResult | ToolError]:
        """Run every tool call written in a model's turn (`<tool_call>`, or `<grounding>` for mini_o3)."""
        try:
            calls: list[ToolCall] = (parse_grounding if self.profile == "mini_o3" else parse_tool_calls)(text)
        except ToolError as e:
            return [e]
        outcomes = []
        for c in calls:
            try:
                outcomes.append(self.call(c.name, c.arguments))
            except ToolError as e:
                outcomes.append(e)
        return outcomes

    def answer(self, question: str, image_id: str | None = None) -> ToolResult:
        """The service's Answer on an original image of the conversation (default: the first)."""
        if image_id is None:
            if not self._images:
                raise ToolError("there is no image in this conversation yet; upload one first")
            image_id = self._images[0].image_id
        elif image_id not in {o.image_id for o in self._images}:
            raise ToolError(f"unknown image_id {image_id!r}; upload the image first")
        try:
            a = self.client.answer(image_id, question, **self.answer_options)
        except QZoomClientError as e:
            raise ToolError(e.details, e.code) from None
        data = {"answer": a.answer, "route": a.route, "gate_score": a.gate_score, "roi_box": a.roi_box,
                "image_id": image_id}
        return ToolResult(text=a.answer, data=data)

    def _zoom(self, target: Target) -> ToolResult:
        src = target.source
        try:
            z = self.client.zoom_region(src.image_id, target.box, target.space, crop_id=src.crop_id,
                                        label=target.label, question=target.question or None,
                                        **self.answer_options)
        except QZoomClientError as e:
            raise ToolError(e.details, e.code) from None
        with self._lock:
            obs = Observation(len(self._images), src.image_id, z.crop_id, z.crop_width, z.crop_height,
                              box=tuple(z.box["original"]), label=target.label)
            self._images.append(obs)
        data = {"crop_id": z.crop_id, "image_id": z.image_id, "img_idx": obs.index, "source_idx": src.index,
                "box": z.box, "width": z.crop_width, "height": z.crop_height, "label": target.label,
                "answer": z.answer}
        return ToolResult(text=_describe(self.profile, src, obs, z.answer, data), png=z.crop_png, observation=obs,
                          data=data)


def _describe(profile: str, src: Observation, obs: Observation, answer: str | None, data: dict) -> str:
    """The text the model reads next to the crop, worded as each agent family was trained to read it."""
    size = f"{obs.width}x{obs.height}"
    box = [round(v) for v in data["box"]["original"]]
    if profile == "generic":
        text = json.dumps({k: data[k] for k in ("crop_id", "image_id", "width", "height")}
                          | {"box_original": box, "box_norm1000": [round(v, 1) for v in data["box"]["norm1000"]]})
    elif profile == "deepeyes":
        label = f" ({obs.label})" if obs.label else ""
        text = f"Zoomed in on the image to the region {box}{label}."
    elif profile == "qwen3vl":
        text = f"Zoomed in on image {src.index}; the crop is image {obs.index} ({size} pixels)."
    elif profile == "pixel_reasoner":
        text = f"Here is the cropped image (Image Size: {size}), image {obs.index + 1}:"
    else:  # mini_o3
        text = f"Here is the zoom-in image (Observation {obs.index}):"
    return text if answer is None else f"{text}\nAnswer about the region: {answer}"

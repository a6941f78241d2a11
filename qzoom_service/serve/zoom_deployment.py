"""`Zoom`: the RoI re-encode and re-decode, for zoom plans from `CoarseGate` and explicit boxes.

It rebuilds the coarse prefix from the coarse features (cached by image id, so usually without the
vision tower) instead of receiving layer 0..K-1 K/V over the network. Batch 1 per request.
"""

from __future__ import annotations

import logging

from ray import serve

from ..config import RequestOptions
from ..engine import ZoomPlan
from ..types import Request, Result
from .settings import AppSettings, build_engine

__all__ = ["Zoom"]

log = logging.getLogger("ray.serve")


@serve.deployment(name="Zoom", ray_actor_options={"num_cpus": 0.5})
class Zoom:
    def __init__(self, settings: dict):
        self.settings = AppSettings.from_dict(settings)
        self.engine, self.cache = build_engine(self.settings)

    def zoom(self, image: bytes, image_id: str, question: str, options: RequestOptions, plan: ZoomPlan) -> Result:
        return self.engine.zoom(Request(image, question, options, image_id), plan)

    def answer_box(self, image: bytes, image_id: str, question: str, options: RequestOptions, box) -> Result:
        request = Request(image, question, options, image_id)
        prepared = self.engine.prepare(request)
        return self.engine.zoom(prepared, self.engine.plan_for_box(prepared, box))

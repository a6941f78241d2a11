"""`Zoom`: the RoI re-encode and re-decode, for zoom plans from `CoarseGate` and explicit boxes.

A routed plan arrives with the prepared request (the image decoded once, in the ingress) and the coarse
features, so the coarse prefix is rebuilt without the vision tower and without receiving layer 0..K-1
K/V over the network. An explicit box arrives with the decoded image; its coarse features come from the
cache or the vision tower here. Batch 1 per request.
"""

from __future__ import annotations

import logging

from ray import serve

from ..engine import ZoomPlan
from ..types import Box, Prepared, Request, Result
from .servicer import answer_box
from .settings import AppSettings, build_engine

__all__ = ["Zoom"]

log = logging.getLogger("ray.serve")


@serve.deployment(name="Zoom", ray_actor_options={"num_cpus": 0.5})
class Zoom:
    def __init__(self, settings: dict):
        self.settings = AppSettings.from_dict(settings)
        self.engine, self.cache = build_engine(self.settings)

    def zoom(self, prepared: Prepared, plan: ZoomPlan) -> Result:
        return self.engine.zoom(prepared, plan)

    def answer_box(self, request: Request, box: Box) -> Result:
        return answer_box(self.engine, request, box)

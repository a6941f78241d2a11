"""The Ray Serve application: `build_app(args)` is the `import_path` of the Serve config.

    CoarseGate (gRPC ingress: auth, validation, image handles, coarse pass, gate, SD-RPN, direct answers)
        └── Zoom (RoI re-encode and re-decode; explicit ZoomRegion questions)

Ray's own loader calls the builder (`serve run` / `serve deploy`, the dashboard's REST API that KubeRay
uses, and `qzoom serve`, which deploys through that REST API too). Per-deployment resources, replicas and
autoscaling come from the Serve config's `deployments:` section (see configs/serve-gpu.yaml), which Ray
applies over the defaults here; everything else from `args` (`AppSettings`).
"""

# No `from __future__ import annotations`: Ray inspects the builder's annotation at run time and
# validates `args` into it only when it is a class, not a string.

from typing import Any

from pydantic import PrivateAttr, RootModel, model_validator
from ray.serve import Application

from .coarse_deployment import CoarseGate
from .settings import APP_NAME, HEALTH_SERVICER_FUNCTION, IMPORT_PATH, SERVICER_FUNCTION, AppSettings
from .zoom_deployment import Zoom

__all__ = ["build_app", "AppArgs", "SERVICER_FUNCTION", "HEALTH_SERVICER_FUNCTION", "APP_NAME", "IMPORT_PATH"]


class AppArgs(RootModel[dict[str, Any]]):
    """The `args:` mapping as Ray Serve hands it to the application builder: Ray validates a builder's
    pydantic-annotated parameter itself (`model_validate`), and this model's validation is
    `AppSettings.from_dict`, so the config path, `qzoom serve` and the tests check the same rules."""

    _settings: AppSettings = PrivateAttr()

    @model_validator(mode="after")
    def _validate_settings(self) -> "AppArgs":
        # InvalidInput is no ValueError: pydantic lets it through with its own message.
        self._settings = AppSettings.from_dict(self.root)
        return self

    @property
    def settings(self) -> AppSettings:
        return self._settings


def build_app(args: AppArgs) -> Application:
    """The application builder: exactly one parameter, as Ray requires; Ray has validated `args` already
    (`AppArgs.model_validate`), a plain dict is validated here for callers outside Ray's loader."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    settings = args.settings.to_dict()
    return CoarseGate.bind(Zoom.bind(settings), settings)

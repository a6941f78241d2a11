"""Prometheus metrics of the service, through Ray Serve's metrics API.

Ray exports them on every node's metrics port (`ray start --metrics-export-port`, 8080 in the Helm
chart) in the Prometheus text format, with Serve's own labels (deployment, replica, application).
"""

from __future__ import annotations

from ray.serve import metrics

__all__ = ["ServiceMetrics"]

_LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
_SCORE = [0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]


class ServiceMetrics:
    """Created once per replica."""

    def __init__(self):
        self.routes = metrics.Counter("qzoom_route_total", "Answers by route taken.", tag_keys=("route", "mode"))
        self.gate = metrics.Histogram("qzoom_gate_score", "Gate probability that zooming is needed.",
                                      boundaries=_SCORE)
        self.tokens = metrics.Counter("qzoom_visual_tokens_total", "Visual tokens processed, by pass.",
                                      tag_keys=("pass",))
        self.baseline_tokens = metrics.Counter(
            "qzoom_baseline_visual_tokens_total",
            "Visual tokens a full-resolution baseline would have processed for the same images.",
        )
        self.cache = metrics.Counter("qzoom_feature_cache_lookups_total", "Coarse-feature cache lookups by result.",
                                     tag_keys=("result",))
        self.cache_errors = metrics.Counter("qzoom_cache_errors_total", "Cache backend errors (Redis down, ...).")
        self.stage_ms = metrics.Histogram("qzoom_stage_latency_ms", "Per-stage latency in milliseconds.",
                                          boundaries=_LATENCY_MS, tag_keys=("stage",))
        self.errors = metrics.Counter("qzoom_request_errors_total", "Requests answered with an error status.",
                                      tag_keys=("method", "code"))
        self._cache_errors_seen = 0

    def record_result(self, result, mode: str, baseline_tokens: int) -> None:
        self.routes.inc(tags={"route": result.route, "mode": mode})
        if result.gate_score is not None:
            self.gate.observe(result.gate_score)
        for name, count in result.visual_tokens.items():
            if count:
                self.tokens.inc(count, tags={"pass": name})
        self.baseline_tokens.inc(baseline_tokens)
        self.cache.inc(tags={"result": "hit" if result.cache_hit else "miss"})
        for stage, ms in result.timings_ms.items():
            self.stage_ms.observe(ms, tags={"stage": stage})

    def record_cache_stats(self, stats: dict) -> None:
        errors = int(stats.get("errors", 0))
        if errors > self._cache_errors_seen:
            self.cache_errors.inc(errors - self._cache_errors_seen)
        self._cache_errors_seen = errors

    def record_error(self, method: str, code: str) -> None:
        self.errors.inc(tags={"method": method, "code": code})

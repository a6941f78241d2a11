"""Prometheus metrics of the service, through Ray Serve's metrics API.

Ray exports them on every node's metrics port (`ray start --metrics-export-port`, 8080 in the Helm
chart) at `/metrics` in the Prometheus text format, each name prefixed `ray_`, with Serve's own labels
(deployment, replica, application). Both deployments record them: `CoarseGate` its RPCs and answers,
`Zoom` its zoom passes; the `deployment` label tells them apart. Latencies are in seconds.
"""

from __future__ import annotations

from ray.serve import metrics

__all__ = ["ServiceMetrics"]

_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_SCORE = [0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]


class ServiceMetrics:
    """Created once per replica (Ray aggregates the replicas' series under their `replica` label)."""

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
        self.feature_cache = metrics.Counter("qzoom_feature_cache_lookups_total",
                                             "Coarse-feature cache lookups per answer, by result.",
                                             tag_keys=("result",))
        self.cache_requests = metrics.Counter(
            "qzoom_cache_requests_total", "Cache operations of this replica's store by kind and result.",
            tag_keys=("backend", "kind", "result"))
        self.stage_seconds = metrics.Histogram("qzoom_stage_duration_seconds",
                                               "Per-stage latency of answers in seconds, by route.",
                                               boundaries=_SECONDS, tag_keys=("stage", "route"))
        self.request_seconds = metrics.Histogram("qzoom_request_duration_seconds",
                                                 "Latency of each call in seconds, by method and status.",
                                                 boundaries=_SECONDS, tag_keys=("method", "code"))
        self.errors = metrics.Counter("qzoom_request_errors_total", "Requests answered with an error status.",
                                      tag_keys=("method", "code"))
        self._cache_seen: dict[tuple[str, str], int] = {}

    def record_result(self, result, mode: str, baseline_tokens: int) -> None:
        self.routes.inc(tags={"route": result.route, "mode": mode})
        if result.gate_score is not None:
            self.gate.observe(result.gate_score)
        for name, count in result.visual_tokens.items():
            if count:
                self.tokens.inc(count, tags={"pass": name})
        self.baseline_tokens.inc(baseline_tokens)
        self.feature_cache.inc(tags={"result": "hit" if result.cache_hit else "miss"})
        for stage, ms in result.timings_ms.items():
            self.stage_seconds.observe(ms / 1000, tags={"stage": stage, "route": result.route})

    def record_cache_stats(self, stats: dict) -> None:
        """Export what the store counted since the last call (`cache.py` keeps plain running totals)."""
        for (kind, result), total in stats.get("requests", {}).items():
            new = total - self._cache_seen.get((kind, result), 0)
            if new > 0:
                self.cache_requests.inc(new, tags={"backend": stats["backend"], "kind": kind, "result": result})
            self._cache_seen[kind, result] = total

    def record_request(self, method: str, code: str, seconds: float) -> None:
        self.request_seconds.observe(seconds, tags={"method": method, "code": code})
        if code != "OK":
            self.errors.inc(tags={"method": method, "code": code})

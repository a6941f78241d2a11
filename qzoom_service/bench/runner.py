"""`qzoom bench`: accuracy, visual tokens and latency on a synthetic set, baseline vs Q-Zoom.

Methods compared on the same samples and the same engine:
- `baseline@N`: the model alone at a budget of N tokens (mode direct, min(256, N)..N tokens), the
  full-resolution baseline being the largest N.
- `qzoom@N[/tau]`: Q-Zoom (mode auto) with an N-token coarse budget and gate threshold tau.
Per method: `accuracy_fine`, `accuracy_coarse`, `mean_visual_tokens`, `mean_latency_ms`, and for Q-Zoom
`gate_skip_rate_coarse` (coarse questions answered without zoom) and `roi_hit_rate_fine` (fine questions
whose RoI box contains the target). Writes results.json, a Pareto plot and RoI overlays into --out.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..config import RequestOptions
from ..overlay import draw_overlay
from ..types import Request
from ..synthetic import Sample, box_contains, chance_accuracy, generate

__all__ = ["Method", "default_methods", "run_bench", "answer_matches"]


@dataclass(frozen=True)
class Method:
    name: str
    options: RequestOptions
    is_qzoom: bool


def default_methods(factor: int, baseline_tokens=(144, 576, 1024, 2304), coarse_tokens=(144, 256),
                    gate_thresholds=(None,)) -> list[Method]:
    """Baselines at each token budget and Q-Zoom at each coarse budget; `factor`: the model's pixels per
    merged-token side (budgets are in tokens, options in pixels)."""
    token_pixels = factor**2
    methods = [Method(f"baseline@{n}", RequestOptions(mode="direct", min_pixels=min(256, n) * token_pixels,
                                                     max_pixels=n * token_pixels), False)
               for n in baseline_tokens]
    for n in coarse_tokens:
        for tau in gate_thresholds:
            name = f"qzoom@{n}" + (f"/{tau}" if tau is not None else "")
            methods.append(Method(name, RequestOptions(mode="auto", gate_threshold=tau,
                                                       min_pixels=min(256, n) * token_pixels,
                                                       max_pixels=n * token_pixels), True))
    return methods


def answer_matches(prediction: str, answer: str) -> bool:
    """Normalised exact match on the first word (the synthetic answers are single words or characters)."""
    words = re.findall(r"[a-z0-9]+", prediction.lower())
    return bool(words) and words[0] == answer.lower()


@dataclass
class _Tally:
    correct: dict = field(default_factory=lambda: {"coarse": 0, "fine": 0})
    count: dict = field(default_factory=lambda: {"coarse": 0, "fine": 0})
    tokens: list = field(default_factory=list)
    latency: list = field(default_factory=list)
    skipped_coarse: int = 0
    hits_fine: int = 0

    def add(self, sample: Sample, result, latency_ms: float) -> None:
        self.count[sample.kind] += 1
        self.correct[sample.kind] += answer_matches(result.answer, sample.answer)
        self.tokens.append(result.visual_tokens["coarse"] + result.visual_tokens["zoom"])
        self.latency.append(latency_ms)
        if sample.kind == "coarse":
            self.skipped_coarse += result.route == "direct"
        elif result.roi_box is not None:
            self.hits_fine += box_contains(result.roi_box, sample.target_box)

    def summary(self, is_qzoom: bool) -> dict:
        def rate(num, kind):
            return num / self.count[kind] if self.count[kind] else None

        total = self.count["fine"] + self.count["coarse"]
        out = {
            "accuracy": (self.correct["fine"] + self.correct["coarse"]) / total,
            "accuracy_fine": rate(self.correct["fine"], "fine"),
            "accuracy_coarse": rate(self.correct["coarse"], "coarse"),
            "mean_visual_tokens": sum(self.tokens) / len(self.tokens),
            "mean_latency_ms": sum(self.latency) / len(self.latency),
            "n_fine": self.count["fine"],
            "n_coarse": self.count["coarse"],
        }
        if is_qzoom:
            out["gate_skip_rate_coarse"] = rate(self.skipped_coarse, "coarse")
            out["roi_hit_rate_fine"] = rate(self.hits_fine, "fine")
        return out


def run_bench(engine, *, split: str = "hr", n: int = 40, seed: int = 1000, methods: list[Method] | None = None,
              out_dir: str | Path | None = None, overlays: int = 4, max_new_tokens: int = 12) -> dict:
    samples = generate(split, n, seed)
    methods = methods or default_methods(engine.loaded.factor)
    summary: dict = {}
    overlay_results = []
    for method in methods:
        tally = _Tally()
        options = RequestOptions(**{**method.options.__dict__, "max_new_tokens": max_new_tokens})
        for sample in tqdm(samples, desc=method.name, leave=False):
            start = time.perf_counter()
            result = engine.answer([Request(sample.image, sample.question, options)])[0]
            tally.add(sample, result, (time.perf_counter() - start) * 1000.0)
            if method.is_qzoom and result.roi_box is not None and len(overlay_results) < overlays:
                overlay_results.append((method.name, sample, result))
        summary[method.name] = tally.summary(method.is_qzoom)
    report = {
        "split": split, "n": n, "seed": seed, "model": engine.loaded.model_id,
        "chance": {"fine": chance_accuracy("fine"), "coarse": chance_accuracy("coarse")},
        "methods": summary,
    }
    if out_dir is not None:
        _write_outputs(Path(out_dir), report, overlay_results)
    return report


def _write_outputs(out: Path, report: dict, overlay_results) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    for i, (name, sample, result) in enumerate(overlay_results):
        image = draw_overlay(sample.image, result.roi_map, result.roi_box)
        image.save(out / f"overlay_{i}_{name.replace('/', '_').replace('@', '_')}.png")
    _pareto_plot(report, out / "pareto.png")


def _pareto_plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the `plot` extra is optional; results.json carries the same numbers
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, m in report["methods"].items():
        accuracy = m["accuracy"]
        throughput = 1000.0 / m["mean_latency_ms"]
        ax.scatter(throughput, accuracy, marker="o" if name.startswith("qzoom") else "s",
                   color="#dd8452" if name.startswith("qzoom") else "#4c72b0")
        ax.annotate(name, (throughput, accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("throughput (samples/s)")
    ax.set_ylabel("accuracy (fine + coarse)")
    ax.set_title(f"{report['split']} split, n={report['n']}, seed={report['seed']}")
    fig.tight_layout()
    fig.savefig(path)

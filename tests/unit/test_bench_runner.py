"""`qzoom bench` bookkeeping: accuracy, skip rate and RoI hit rate computed from what the engine returns."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

from qzoom_service.bench.runner import answer_matches, default_methods, run_bench
from qzoom_service.synthetic import generate
from qzoom_service.types import Result


class ScriptedEngine:
    """Answers coarse questions right without zooming; fine questions by zooming onto the true target,
    right only on even-numbered calls. Everything else is what a real engine returns."""

    def __init__(self, samples):
        self.truth = {(s.question, s.image.tobytes()): s for s in samples}
        self.calls = 0
        self.loaded = SimpleNamespace(model_id="scripted")

    def answer(self, requests):
        (request,) = requests
        sample = self.truth[(request.question, request.image.tobytes())]
        self.calls += 1
        zoom = sample.kind == "fine"
        right = not zoom or self.calls % 2 == 0
        return [Result(answer=sample.answer if right else "nope", route="zoom" if zoom else "direct",
                       gate_score=0.9 if zoom else 0.01, roi_map=[[0.5]], roi_box=sample.target_box if zoom else None,
                       visual_tokens={"coarse": 100, "zoom": 50 if zoom else 0}, generated_ids=[1], timings_ms={},
                       original_size=sample.image.size, input_size=(28, 28))]


def test_answer_matching_is_first_word_normalised():
    assert answer_matches("Red.", "red") and answer_matches(" 7 ", "7") and not answer_matches("dark red", "red")
    assert not answer_matches("", "red")


def test_rates_follow_the_engine_outputs(tmp_path):
    samples = generate("hr", 12, seed=5)
    engine = ScriptedEngine(samples)
    methods = [m for m in default_methods(28, baseline_tokens=(144,), coarse_tokens=(144,)) if m.is_qzoom]
    report = run_bench(engine, split="hr", n=12, seed=5, methods=methods, out_dir=tmp_path)
    m = report["methods"]["qzoom@144"]
    n_fine = sum(s.kind == "fine" for s in samples)
    assert m["n_fine"] == n_fine and m["n_coarse"] == 12 - n_fine and 0 < n_fine < 12
    assert m["accuracy_coarse"] == 1.0 and m["gate_skip_rate_coarse"] == 1.0 and m["roi_hit_rate_fine"] == 1.0
    assert 0.0 < m["accuracy_fine"] < 1.0
    assert m["mean_visual_tokens"] == (100 * 12 + 50 * n_fine) / 12
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["qzoom@144"] == m
    assert list(tmp_path.glob("overlay_*.png"))


def test_bench_cli_prints_one_json_summary(tiny_checkpoint):
    out = subprocess.run([sys.executable, "-m", "qzoom_service.cli", "bench", "--model", str(tiny_checkpoint),
                          "--n", "3", "--baseline-tokens", "144", "--coarse-tokens", "64", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert set(summary) == {"baseline@144", "qzoom@64"}
    for key in ("accuracy_fine", "accuracy_coarse", "mean_visual_tokens", "mean_latency_ms"):
        assert key in summary["baseline@144"] and key in summary["qzoom@64"]
    assert "gate_skip_rate_coarse" in summary["qzoom@64"] and "roi_hit_rate_fine" in summary["qzoom@64"]


def test_synth_cli_writes_a_training_dataset(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qzoom_service.cli", "synth", "--split", "doc", "--n", "3",
                          "--seed", "4", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all((tmp_path / r["image"]).is_file() for r in rows)
    assert rows[0]["question"] == generate("doc", 3, seed=4)[0].question

"""clients/examples/agent_loop.py, run as a user runs it (a subprocess, the README's command) against a real
`qzoom serve`: zoom, zoom into that crop, ask the service, answer."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOOP = ROOT / "clients" / "examples" / "agent_loop.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_scripted_agent_zooms_twice_asks_and_answers(qzoom_serve):
    out = _run([sys.executable, str(LOOP), "--addr", qzoom_serve, "--json"])
    assert out.returncode == 0, out.stderr[-3000:]
    trajectory = json.loads(out.stdout)
    assert trajectory["image"]["width"] == 1344 and len(trajectory["steps"]) == 4
    first, second, asked, answered = trajectory["steps"]
    (zoom,) = first["results"]
    assert zoom["img_idx"] == 1 and zoom["box"]["original"] == [940, 655, 1277, 958]  # 0-1000 of the original
    (inner,) = second["results"]
    assert inner["img_idx"] == 2 and inner["box"]["original"] == [1074, 776, 1149, 849]  # 0-1000 of crop 1
    (said,) = asked["results"]
    assert said["route"] in ("direct", "zoom") and isinstance(said["answer"], str)
    assert answered["results"] == [] and "<answer>" in answered["assistant"]
    assert trajectory["images_in_conversation"] == 3 and trajectory["messages"] == 2 + 4 + 3


def test_the_readme_command_runs_as_written(qzoom_serve):
    readme = ROOT.joinpath("clients", "python", "README.md").read_text()
    section = readme.split("## Agent tools", 1)[1].split("\n## ", 1)[0]
    (command,) = re.findall(r"^(\.venv/bin/python clients/examples/agent_loop\.py .*)$", section, flags=re.M)
    args = shlex.split(command.split("#")[0].replace("127.0.0.1:9000", qzoom_serve))
    out = _run([sys.executable] + args[1:])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[tool] Zoomed in on image 1; the crop is image 2 (75x73 pixels)." in out.stdout
    assert out.stdout.strip().endswith("[done] 4 turns, 3 images in the conversation")


def test_an_unreachable_service_is_a_clear_error():
    out = _run([sys.executable, str(LOOP), "--addr", "127.0.0.1:9"])
    assert out.returncode == 2 and out.stderr.startswith("agent_loop: UNAVAILABLE: ")

"""The README's two commands, exactly as written: the test command is what CI runs, the main command works."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _two_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    main_cmd, test_cmd = _two_commands()
    assert "pytest" in test_cmd and "install" in test_cmd
    assert test_cmd in ROOT.joinpath(".ci/run").read_text().splitlines()


def test_readme_main_command_runs_as_written():
    main_cmd, _ = _two_commands()
    out = subprocess.run(["bash", "-c", main_cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "route=" in out.stderr and "tokens=" in out.stderr

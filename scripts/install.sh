#!/usr/bin/env bash
# Create .venv (if missing) and install qzoom-service (with its test extras) and qzoom-client (with its agent-tool
# integrations, which the tests exercise) into it.
# torch is installed first and pinned so pip keeps the CPU build on machines that carry it locally;
# set QZOOM_TORCH (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128") to choose another.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ${QZOOM_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install --quiet -e "clients/python[mcp,langchain,qwen-agent]" -e ".[test]"

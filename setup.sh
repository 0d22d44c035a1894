#!/usr/bin/env bash
# Set up a virtual environment in .venv with pretrainer and its test dependencies.
# PyTorch is installed first and pinned, so that pip never pulls a multi-GB CUDA build where a
# CPU wheel is meant (on machines with their own torch, set TORCH_SPEC, e.g. TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC" >&2
  "${PIP[@]}" "$TORCH_SPEC"
fi
echo "setup: installing pretrainer (editable) with test dependencies" >&2
"${PIP[@]}" -e ".[test]"
.venv/bin/python -c "import torch, pretrainer; print(f'setup: ready (torch {torch.__version__}, pretrainer {pretrainer.__version__})')" >&2

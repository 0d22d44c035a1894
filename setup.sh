#!/usr/bin/env bash
# Set up a virtual environment in .venv with pretrainer: `bash setup.sh` for what the commands need,
# `bash setup.sh test` for the test dependencies too (transformers, lm-eval, tensorboard, datasets).
# PyTorch is installed first and pinned, so that pip never pulls a multi-GB CUDA build where a
# CPU wheel is meant (on machines with their own torch, set TORCH_SPEC, e.g. TORCH_SPEC=torch).
# Running it again skips what is already installed for the same pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
case "${1:-}" in
  "") EXTRAS="" ;;
  test) EXTRAS="[test]" ;;
  *) echo "setup: unknown argument '$1'; expected nothing or 'test'" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# what this set-up installs, as a stamp: the same pyproject, extras and torch need nothing new
STAMP=".venv/.setup-$( (cat pyproject.toml setup.sh; echo "$EXTRAS $TORCH_SPEC") | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && .venv/bin/python -c "import torch, pretrainer" 2>/dev/null; then
  echo "setup: already set up (${EXTRAS:-commands only}); nothing to install" >&2
  exit 0
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC" >&2
  "${PIP[@]}" "$TORCH_SPEC"
fi
echo "setup: installing pretrainer (editable)${EXTRAS:+ with its test dependencies}" >&2
"${PIP[@]}" -e ".$EXTRAS"
.venv/bin/python -c "import torch, pretrainer; print(f'setup: ready (torch {torch.__version__}, pretrainer {pretrainer.__version__})')" >&2
touch "$STAMP"

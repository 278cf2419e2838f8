#!/usr/bin/env bash
# Regenerate every table of FedLLM-Bench (docs/RUN_ALL.md): bash run_all.sh [--smoke] [--only table3] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  echo "No .venv here: create it first with: bash setup.sh" >&2
  exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec .venv/bin/python -m reproduce "$@"

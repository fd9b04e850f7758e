#!/usr/bin/env bash
# Create .venv (if missing) and install defuser-quant with every extra, against constraints.txt.
# With --newest: create .venv-newest instead, with the newest Transformers tested
# (constraints-newest.txt) and no quantizer (none installs next to it).
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
CONSTRAINTS=constraints.txt
EXTRAS=all
if [ "${1:-}" = "--newest" ]; then
  VENV=.venv-newest
  CONSTRAINTS=constraints-newest.txt
  EXTRAS=calibration,dev
elif [ -n "${1:-}" ]; then
  echo "bootstrap.sh: unknown option '$1' (use no option, or --newest)" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from its exact pin, so no resolver ever reaches for a CUDA build.
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"

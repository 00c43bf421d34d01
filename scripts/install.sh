#!/usr/bin/env bash
# Create .venv (or reuse it) and install fwdfleet with the extras named in $FWDFLEET_EXTRAS
# (default: export,fleet,dev). torch is installed first and pinned to 2.13.0, the CPU build
# on these machines, so that peft/transformers never pull in a newer multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${FWDFLEET_EXTRAS:-export,fleet,dev}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [[ ",$EXTRAS," == *",export,"* ]]; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
echo "installed fwdfleet with [${EXTRAS}] into .venv"

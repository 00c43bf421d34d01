#!/usr/bin/env bash
# The test command: install into .venv, then lint (ruff), type-check (mypy, strict on the
# device side) and run the test suite (pytest). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"; ruff check .
echo "== mypy"; mypy fwdfleet
echo "== pytest"; pytest -q "$@"

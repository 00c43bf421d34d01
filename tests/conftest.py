"""Test-wide setup: the repository root is importable, so tests can call the scripts in
``benchmarks/`` (a folder of scripts, not an installed package) as functions."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

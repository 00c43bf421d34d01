"""`pip install .` without extras, then `fwdfleet demo`: the README's first command in the base install.

A fresh venv gets the package from a copy of this checkout (so the build leaves nothing in the
repo) with only its base dependencies (pip's cache makes this quick); no torch, scikit-learn or
matplotlib is installed, every package sits under the ``fwdfleet`` import namespace, and the
demo still trains the digits fleet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.partial")


@pytest.mark.slow
def test_pip_install_without_extras_runs_the_demo(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=NOT_SOURCE)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(src)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    probe = ("import importlib.util as u, json; "
             "print(json.dumps({n: u.find_spec(n) is not None for n in "
             "('export', 'fleet', 'pff', 'device_runtime', 'aggregator', 'torch', 'sklearn', 'matplotlib', "
             "'tqdm', 'onnx', 'fwdfleet.export', 'fwdfleet.fleet', 'fwdfleet.pff')}))")
    found = json.loads(subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env=env,
                                      cwd=tmp_path, check=True, timeout=120).stdout)
    assert not any(found[n] for n in ("export", "fleet", "pff", "device_runtime", "aggregator")), found
    assert not any(found[n] for n in ("torch", "sklearn", "matplotlib", "tqdm")), found  # the base install only
    assert all(found[n] for n in ("onnx", "fwdfleet.export", "fwdfleet.fleet", "fwdfleet.pff")), found

    r = subprocess.run([str(venv / "bin" / "fwdfleet"), "demo", "--out", str(tmp_path / "demo"),
                        "--set", "fleet.rounds=30", "--json"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["rounds"] == 30 and summary["devices"] == 20
    assert summary["initial_accuracy"] < 0.3 and summary["final_accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert summary["uplink_bytes_per_device_per_round"] < 200 < summary["dense_update_bytes"]
    report = Path(summary["report"]).read_text()
    assert "plots need matplotlib" in report and not list((tmp_path / "demo").glob("*.png"))

"""The device side (device_runtime, aggregator, the CLI shell) imports and works with torch absent.

Each check runs in a fresh interpreter whose import system refuses torch, transformers and
peft, as on a phone or a Raspberry Pi that installed only the base dependencies.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "peft", "onnxscript"}:
                raise ImportError(f"{name} is blocked: the device side must not need it")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )



@pytest.mark.parametrize("package", ["fwdfleet.device_runtime", "fwdfleet.aggregator", "fwdfleet", "fwdfleet.cli"])
def test_every_module_imports_without_torch(package):
    path = package.replace(".", "/")
    modules = [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / path)])]
    code = "import importlib, sys\n"
    code += "".join(f"importlib.import_module({m!r})\n" for m in [package, *modules])
    code += "assert 'torch' not in sys.modules\nprint('ok', len(sys.modules))\n"
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_cli_help_without_torch():
    r = _run("from fwdfleet.cli.main import main\nimport sys\nsys.argv=['fwdfleet','--help']\nmain()\n")
    assert "usage: fwdfleet" in r.stdout, r.stderr


def test_perturbed_step_on_a_bundle_without_torch(tmp_path):
    r = _run(
        f"""
        import sys, numpy as np
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from _tiny_bundles import make_classifier_bundle
        from fwdfleet.device_runtime.session import BundleSession
        from fwdfleet.device_runtime.estimator import estimate
        from fwdfleet.task import RoundTask
        b = make_classifier_bundle({str(tmp_path / "b")!r}, in_dim=8, num_classes=3)
        s = BundleSession(b)
        rng = np.random.default_rng(0)
        batch = {{"x": rng.standard_normal((4, 8)).astype(np.float32), "labels": np.array([0, 1, 2, 0])}}
        res = estimate(s, b.load_trainables(), batch, RoundTask(round_id=0, model_version=0,
                       round_seed=1, device_index=2, num_perturbations=3))
        assert len(res.derivatives) == 3 and 'torch' not in sys.modules
        print('ok')
        """
    )
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


@pytest.mark.parametrize("package", ["fwdfleet.device_runtime", "fwdfleet.aggregator"])
def test_the_device_side_never_imports_onnx(package):
    # onnx is a base dependency (the demo builds its MLP with onnx.helper), but a phone installs
    # with --no-deps and without it: only onnxruntime may be needed to train
    path = package.replace(".", "/")
    modules = [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / path)])]
    code = "import importlib, sys\n"
    code += "".join(f"importlib.import_module({m!r})\n" for m in [package, *modules])
    code += "assert 'onnx' not in sys.modules\nprint('ok')\n"
    r = _run(BLOCK.replace('"onnxscript"}', '"onnxscript", "onnx"}') + code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")

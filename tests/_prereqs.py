"""What some tests need from outside pip, and what happens when it is missing.

System packages (qemu-user-static and debootstrap for the emulated ARM64 device, the Fashion-MNIST
package) and data beside the checkout (AG News at ``../shared/data``) may be absent on a
developer's machine: a test that needs one skips and says how to get it. In CI (``FWDFLEET_CI=1``,
exported by ``.ci/run``) a missing prerequisite fails the run instead, so a broken CI image cannot
turn tests into silent skips.

pip dependencies of the ``dev`` extra are never skipped: :func:`dev_dependency` fails.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = os.environ.get("FWDFLEET_CI") == "1"


def _shared_data(name: str) -> Path:
    """``shared/data/<name>`` beside the checkout (CI: ``../shared/data``), or beside an ancestor
    folder (a git worktree nested below the main checkout's parent)."""
    for folder in ROOT.parents:
        if (folder / "shared" / "data" / name).is_file():
            return folder / "shared" / "data" / name
    return ROOT.parent / "shared" / "data" / name


AG_NEWS = _shared_data("ag_news_test.csv")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def missing(what: str, how: str) -> NoReturn:
    """Skip the calling test (fail it under ``FWDFLEET_CI=1``) because ``what`` is absent."""
    if CI:
        pytest.fail(f"FWDFLEET_CI=1 and {what} is missing: {how}", pytrace=False)
    pytest.skip(f"{what} is missing: {how}")


def ag_news() -> Path:
    if not AG_NEWS.is_file():
        missing(f"AG News ({AG_NEWS})", "put the shared data folder at ../shared/data beside the checkout")
    return AG_NEWS


def fashion_mnist() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        missing(f"Fashion-MNIST ({FASHION_MNIST})", "apt-get install -y dataset-fashion-mnist")
    return FASHION_MNIST


def dev_dependency(name: str) -> ModuleType:
    """Import ``name``, a dependency of the ``dev`` extra; its absence fails the test run."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"{name} is not installed, but the tests need it: pip install -e '.[dev]' ({e})", pytrace=False)

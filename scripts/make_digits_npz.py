"""Regenerate ``fleet/digits.npz``: scikit-learn's 1,797 8x8 handwritten digits, for ``fwdfleet demo``.

The data is the UCI "Optical Recognition of Handwritten Digits" test set as scikit-learn ships
it (BSD-3-Clause, like scikit-learn). It is stored as uint8 pixel counts 0..16 (``images``,
shape (1797, 64)) and uint8 labels (``labels``), compressed, so the demo runs in the base
install without scikit-learn. Run: ``python scripts/make_digits_npz.py`` (needs scikit-learn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "fleet" / "digits.npz"


def main() -> None:
    x, y = load_digits(return_X_y=True)
    assert x.shape == (1797, 64) and x.min() >= 0 and x.max() <= 16 and np.all(x == np.round(x))
    np.savez_compressed(OUT, images=x.astype(np.uint8), labels=y.astype(np.uint8))
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()

"""Forward-Forward MLP trained on one device, layer-local, per objective and training mode.

Exports an FF MLP bundle per head type, trains it with ``device_runtime.ff_train.train_ff``
(closed-form local gradients, or perturbed inference of each layer's ONNX graph) and prints the
held-out accuracy, predicting from all layers and from all but the first (Hinton). Data:
scikit-learn's digits (64 inputs scaled to [0, 1], 1,400 train / 397 test, shuffled with seed 0),
or Fashion-MNIST when ``--dataset fashion`` and its IDX files are in
``/usr/share/datasets/fashion-mnist`` (``auto`` picks Fashion-MNIST when present).

    python benchmarks/ff_digits.py                     # digits, every objective and mode
    python benchmarks/ff_digits.py --modes closed_form --epochs 10 --json
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.ff import FFLayout
from fwdfleet.device_runtime.ff_train import FFTrainConfig, evaluate_ff, train_ff
from fwdfleet.export.ff_mlp import FFMLPConfig, export_ff_mlp

FASHION = Path("/usr/share/datasets/fashion-mnist")
HEAD_OF = {"hinton": "none", "symmetric": "none", "sff": "class-goodness", "pon": "softmax"}
# Zeroth-order steps: plain SGD (Adam normalises the estimate's noise into full-size steps); the
# goodness losses have small gradients at init, the cross-entropy heads large ones.
PERTURBED_LR = {"hinton": 0.2, "symmetric": 0.2, "sff": 0.01, "pon": 0.01}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (FASHION / name).is_file():
            return FASHION / name
    raise FileNotFoundError(f"{FASHION}/{stem}[.gz] not found")


def load_data(dataset: str, limit: int | None) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if dataset == "auto":
        dataset = "fashion" if FASHION.is_dir() else "digits"
    if dataset == "fashion":
        xtr = _read_idx(_find("train-images-idx3-ubyte")).reshape(-1, 784).astype(np.float32) / 255.0
        ytr = _read_idx(_find("train-labels-idx1-ubyte")).astype(np.int64)
        xte = _read_idx(_find("t10k-images-idx3-ubyte")).reshape(-1, 784).astype(np.float32) / 255.0
        yte = _read_idx(_find("t10k-labels-idx1-ubyte")).astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        order = np.random.default_rng(0).permutation(len(d.target))
        x, y = (d.data[order] / 16.0).astype(np.float32), d.target[order].astype(np.int64)
        xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    if limit:
        xtr, ytr = xtr[:limit], ytr[:limit]
    return dataset, xtr, ytr, xte, yte


def run(args: argparse.Namespace) -> dict[str, object]:
    dataset, xtr, ytr, xte, yte = load_data(args.dataset, args.limit)
    widths = [int(w) for w in args.hidden.split(",")]
    layers = (xtr.shape[1], *widths)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {}
        for objective in args.objectives:
            head = HEAD_OF[objective]
            if head not in bundles:
                cfg = FFMLPConfig(layers=layers, num_classes=10, heads=head, seed=args.seed)
                bundles[head] = load_bundle(export_ff_mlp(cfg, Path(tmp) / head))
        for objective in args.objectives:
            bundle = bundles[HEAD_OF[objective]]
            layout = FFLayout.from_manifest(bundle.manifest)
            for mode in args.modes:
                perturbed = mode == "perturbed"
                config = FFTrainConfig(
                    objective=objective, negatives=args.negatives, mode=mode, seed=args.seed,
                    epochs=args.perturbed_epochs if perturbed else args.epochs,
                    optimizer=args.perturbed_optimizer if perturbed else "adam",
                    lr=(args.perturbed_lr or PERTURBED_LR[objective]) if perturbed else args.lr,
                    num_perturbations=args.k, eps=args.eps,
                )
                start = time.perf_counter()
                result = train_ff(bundle, xtr, ytr, config)
                seconds = time.perf_counter() - start
                acc = {sl: evaluate_ff(layout, result.trainables, xte, yte, score_layers=sl).accuracy
                       for sl in ("all", "all_but_first")}
                rows.append({
                    "objective": objective, "mode": mode, "epochs": config.epochs, "optimizer": config.optimizer,
                    "lr": config.lr, "negatives": args.negatives if HEAD_OF[objective] == "none" else None,
                    "accuracy_all_layers": round(acc["all"], 4),
                    "accuracy_all_but_first": round(acc["all_but_first"], 4),
                    "train_seconds": round(seconds, 2), "steps": int(result.metrics["steps"]),
                })
                if not args.json:
                    r = rows[-1]
                    print(f"{objective:<10} {mode:<12} epochs {r['epochs']:>3}  acc(all) {r['accuracy_all_layers']:.3f}"
                          f"  acc(all but first) {r['accuracy_all_but_first']:.3f}  {seconds:6.1f} s", flush=True)
    return {"dataset": dataset, "layers": list(layers), "train": int(xtr.shape[0]), "test": int(xte.shape[0]),
            "batch_size": 64, "k": args.k, "eps": args.eps, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("auto", "digits", "fashion"), default="digits")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--hidden", default="256,256", help="hidden widths (default: %(default)s)")
    p.add_argument("--objectives", nargs="+", default=["hinton", "symmetric", "sff", "pon"],
                   choices=list(HEAD_OF))
    p.add_argument("--modes", nargs="+", default=["closed_form", "perturbed"], choices=["closed_form", "perturbed"])
    p.add_argument("--negatives", choices=("adaptive", "random", "fixed"), default="adaptive")
    p.add_argument("--epochs", type=int, default=10, help="closed-form epochs (default: %(default)s)")
    p.add_argument("--perturbed-epochs", type=int, default=5, help="perturbed-mode epochs (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="closed-form Adam learning rate (default: %(default)s)")
    p.add_argument("--perturbed-lr", type=float, default=None,
                   help="perturbed-mode SGD learning rate (default: per objective, see PERTURBED_LR)")
    p.add_argument("--perturbed-optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--k", type=int, default=8, help="perturbations per step in perturbed mode (default: %(default)s)")
    p.add_argument("--eps", type=float, default=1e-2, help="perturbation scale (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

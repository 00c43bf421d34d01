"""Peak memory of a 1.1B-parameter Llama on the device runtime against torch backprop.

FwdLLM's headline is that perturbed inference fine-tunes billion-parameter LLMs in the memory of
an inference. This script builds a folder with TinyLlama's shape (22 layers, hidden 2048, 32 query
/ 4 key-value heads, intermediate 5632, vocabulary 32,000, random weights drawn from a seed: the
weights' values do not change memory), exports it as a ``causal_lm_lora`` bundle with LoRA r=8 on
q and v in fp32, derives weight-only int8 and 4-bit (``MatMulNBits``) copies of it, and measures with
:func:`fwdfleet.device_runtime.memory.measure_memory` (each figure the VmHWM of a fresh process):

* ``inference``: two forwards of the batch;
* ``train``: one perturbed training step (K central differences, 2K forwards, and the update);
* ``torch``: the bundle's torch twin, forward + backward + AdamW over the LoRA values;
* ``torch-ckpt``: the same with gradient checkpointing.

Batch 4, sequence 256, two onnxruntime threads, the runtime's default session options (memory
pattern off, arena on). Writes the raw figures as JSON and prints a Markdown table.

    python benchmarks/llm_memory.py --out docs/results/llm_memory.json
    python benchmarks/llm_memory.py --quantize int4-weight --modes inference,train   # quicker

The export of the fp32 graph (4.4 GB of weights) goes through the legacy exporter with fixed
shapes and writes one external data file; it needs about 7 GB of RAM and a few minutes here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fwdfleet.device_runtime.memory import RuntimeOptions, measure_memory  # noqa: E402
from fwdfleet.export.torch_memory import WORKERS  # noqa: E402

TINYLLAMA_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32",
}  # fmt: skip
QUANTIZATIONS = ("none", "int8-weight", "int4-weight")


def tinyllama_folder(path: Path) -> Path:
    """``config.json`` with TinyLlama's shape and a word-level tokenizer with its 32,000 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINYLLAMA_SHAPE, indent=2))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINYLLAMA_SHAPE["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(path)
    return path


def export(folder: Path, work: Path, quantize: str, batch: int, seq: int) -> Path:
    """The fp32 bundle (exported once), or a quantized copy of it (:func:`export.quantize.quantize_bundle`:
    the same graph with its frozen weights quantized, much faster than a second export)."""
    from fwdfleet.bundle import load_bundle
    from fwdfleet.export.causal_lm import CausalLmExport, export_causal_lm
    from fwdfleet.export.hf import LoraSettings
    from fwdfleet.export.onnx_graph import GraphOptions
    from fwdfleet.export.quantize import quantize_bundle

    fp32, out = work / "bundle-none", work / f"bundle-{quantize}"
    if not (fp32 / "manifest.json").exists():
        cfg = CausalLmExport(
            source=folder, lora=LoraSettings(rank=8, alpha=16, target_modules=("q_proj", "v_proj")), max_length=seq,
            random_init=True, seed=0, graph=GraphOptions(batch_size=batch, sequence_length=seq, exporter="legacy"),
        )  # fmt: skip
        start = time.perf_counter()
        export_causal_lm(cfg, fp32, overwrite=True)
        print(f"exported {fp32.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if quantize != "none" and not (out / "manifest.json").exists():
        start = time.perf_counter()
        quantize_bundle(load_bundle(fp32), out, quantize, overwrite=True)
        print(f"quantized {out.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return fp32 if quantize == "none" else out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/llm_memory", help="folder and bundles go here (default: %(default)s)")
    p.add_argument("--quantize", default=",".join(QUANTIZATIONS),
                   help="comma-separated subset of " + ", ".join(QUANTIZATIONS))
    p.add_argument("--modes", default=",".join(WORKERS), help="comma-separated subset of " + ", ".join(WORKERS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sequence-length", type=int, default=256)
    p.add_argument("--k", type=int, default=1, help="perturbations in the training step (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="write the raw figures as JSON here")
    a = p.parse_args(argv)
    work = Path(a.work)
    folder = tinyllama_folder(work / "tinyllama-shape")
    rows: list[dict[str, Any]] = []
    for q in [s.strip() for s in a.quantize.split(",") if s.strip()]:
        bundle = export(folder, work, q, a.batch_size, a.sequence_length)
        modes = [m for m in a.modes.split(",") if m and (q == "none" or not m.startswith("torch"))]
        report = measure_memory(bundle, batch_size=a.batch_size, sequence_length=a.sequence_length,
                                num_perturbations=a.k, options=RuntimeOptions(threads=a.threads), modes=modes,
                                workers=WORKERS, timeout=3600)  # fmt: skip
        rows.append({"quantization": q, **report.to_json()})
        for f in report.figures:
            print(f"{q:<12} {f.mode:<11} {f.peak_mb or float('nan'):9.1f} MB  {f.note}", file=sys.stderr)
        if a.out:  # after every bundle, so a long run keeps what it measured
            Path(a.out).write_text(json.dumps({"model": TINYLLAMA_SHAPE, "rows": rows}, indent=2) + "\n")
    print("| weights | mode | peak RSS (MB) | step / inference | note |")
    print("| --- | --- | ---: | ---: | --- |")
    for r in rows:
        for f in r["figures"]:
            ratio = r["train_over_inference"] if f["mode"] == "train" else None
            peak = f"{f['peak_mb']:,.0f}" if f["peak_mb"] else "n/a"
            print(f"| {r['quantization']} | {f['mode']} | {peak} | {f'{ratio:.2f}' if ratio else ''} | {f['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

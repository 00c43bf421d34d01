"""A tiny LoRA causal LM trained by perturbed inference on AG News text: held-out loss goes down.

Builds a 2-layer random Llama (hidden 64) whose sentencepiece tokenizer is trained on AG News
lines, exports it as a ``causal_lm_lora`` bundle (LoRA r=8 on q/v/o projections) and trains
the LoRA tensors with scalar uploads across emulated devices (``fleet.emulate`` against the real
Coordinator: seeds down, ``(k, d_k)`` pairs up). Reports the held-out next-token loss per round.
The frozen weights are random, so the LoRA can only learn shallow statistics (token frequencies,
short-range co-occurrence): the point is that forward-only federated training of a causal LM
moves its held-out loss, not a good language model.

    python benchmarks/causal_lm_zo.py --json
    python benchmarks/causal_lm_zo.py --rounds 150 --devices 20
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fwdfleet.aggregator.config import AggregatorConfig, OptimizerConfig, PerturbationConfig, RoundsConfig  # noqa: E402
from fwdfleet.bundle import Bundle, load_bundle  # noqa: E402
from fwdfleet.device_runtime.data import RawData  # noqa: E402
from fwdfleet.fleet.emulate import EmulationSettings, emulate  # noqa: E402
from fwdfleet.fleet.partition import PartitionConfig, partition  # noqa: E402
from fwdfleet.fleet.profiles import PRESETS  # noqa: E402


def ag_news_texts(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    return [f"{r[1]}. {r[2]}" for r in rows]


def tiny_llama_folder(folder: Path, corpus: list[str], *, vocab: int = 512, hidden: int = 64, seed: int = 0) -> Path:
    """A random 2-layer Llama with a sentencepiece unigram tokenizer trained on ``corpus``."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("\n".join(corpus), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=vocab,
                                   model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    text.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def build_bundle(work: Path, corpus: list[str], *, max_length: int, seed: int = 0, vocab: int = 512,
                 hidden: int = 64) -> Bundle:
    from fwdfleet.export.causal_lm import CausalLmExport, export_causal_lm
    from fwdfleet.export.hf import LoraSettings

    out = work / "bundle"
    if (out / "manifest.json").is_file():  # reuse an earlier export of the same work folder
        return load_bundle(out, verify=False)
    folder = tiny_llama_folder(work / "tiny-llama", corpus, vocab=vocab, hidden=hidden, seed=seed)
    export_causal_lm(CausalLmExport(source=folder, max_length=max_length, seed=seed,
                                    lora=LoraSettings(rank=8, alpha=16, target_modules=("q_proj", "v_proj", "o_proj"))),
                     out, overwrite=True)
    return load_bundle(out, verify=False)


def run(*, data: Path, work: Path, rounds: int = 60, devices: int = 10, per_round: int = 5, k: int = 4,
        lr: float = 1.0, eps: float = 1e-2, train_texts: int = 2000, test_texts: int = 200,
        tokenizer_texts: int = 2000, max_length: int = 48, eval_every: int = 10, seed: int = 0,
        vocab: int = 512, hidden: int = 64) -> dict[str, Any]:
    """Export, train forward-only in an emulated fleet, return the held-out loss curve."""
    started = time.perf_counter()
    texts = ag_news_texts(data)
    order = np.random.default_rng(seed).permutation(len(texts))
    train = [texts[i] for i in order[:train_texts]]
    test = [texts[i] for i in order[train_texts : train_texts + test_texts]]
    bundle = build_bundle(work, [texts[i] for i in order[:tokenizer_texts]], max_length=max_length, seed=seed,
                          vocab=vocab, hidden=hidden)
    export_s = time.perf_counter() - started
    train_raw = RawData(labels=None, texts=tuple(train), source="ag-news train text")
    test_raw = RawData(labels=None, texts=tuple(test), source="ag-news held-out text")
    shards = partition(np.zeros(len(train), dtype=np.int64), PartitionConfig(scheme="iid", num_devices=devices,
                                                                              seed=seed))
    cfg = AggregatorConfig(
        mode="scalar", master_seed=seed,
        rounds=RoundsConfig(fraction=per_round / devices, min_devices=per_round, batch_size=16, deadline_s=60.0),
        perturbation=PerturbationConfig(k=k, eps=eps),
        optimizer=OptimizerConfig(name="sgd", lr=lr, schedule="linear", total_steps=rounds, final_lr_ratio=0.2),
    )
    settings = EmulationSettings(rounds=rounds, eval_every=eval_every, eval_batch=50, seed=seed)
    profiles = [PRESETS["raspberry-pi-4"]] * devices
    from fwdfleet.fleet.emulate import Evaluator

    initial_loss = Evaluator(bundle, test_raw, 50)(bundle.load_trainables())[0]
    records = [{"model_version": 0, "loss": initial_loss, "bytes_up_per_device": 0.0, "sim_time_s": 0.0}]
    for rec in emulate(bundle, cfg, train_raw, shards, profiles, settings, test=test_raw):
        d = rec.to_json()
        records.append({k2: d[k2] for k2 in ("model_version", "loss", "bytes_up_per_device", "sim_time_s",
                                               "participants", "wall_time_s")})
        if rec.loss is not None:
            print(f"  round {rec.model_version:4d} held-out loss {rec.loss:.4f}", file=sys.stderr, flush=True)
    losses = [r["loss"] for r in records if r["loss"] is not None]
    ups = [r["bytes_up_per_device"] for r in records[1:] if r["bytes_up_per_device"]]
    return {
        "trainable_values": bundle.manifest.num_trainable, "vocab": vocab, "hidden": hidden,
        "train_texts": len(train), "test_texts": len(test), "devices": devices, "per_round": per_round, "k": k,
        "lr": lr, "eps": eps, "rounds": rounds, "initial_loss": losses[0], "final_loss": losses[-1],
        "best_loss": min(losses), "bytes_up_per_device_per_round": float(np.mean(ups)) if ups else 0.0,
        "records": records, "export_seconds": export_s, "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/ag_news_test.csv")
    p.add_argument("--work", default="", help="folder for the model and bundle (default: a temporary one)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        out = run(data=Path(args.data), work=work, rounds=args.rounds, devices=args.devices,
                  per_round=args.per_round, k=args.k, lr=args.lr, eps=args.eps, eval_every=args.eval_every,
                  seed=args.seed)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"held-out loss {out['initial_loss']:.4f} -> {out['final_loss']:.4f} (best {out['best_loss']:.4f}) "
              f"in {out['rounds']} rounds; uplink {out['bytes_up_per_device_per_round']:.0f} B/device/round; "
              f"{out['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Kind ``seq_cls_lora``: a LoRA, adapter, IA3 or BitFit sequence classifier from a local encoder folder.

The model is a BERT-family encoder with LoRA on some Linear layers (``peft``), bottleneck
adapters after each layer's feed-forward output (:mod:`export.adapters`) or IA3 scaling vectors
(``peft``), masked mean (or CLS) pooling and a linear head. Trainable: the LoRA A/B matrices,
the adapters' down/up weights and biases or the IA3 vectors (and/or the biases, BitFit) and
the head, named as in
``SequenceClassifier.named_parameters()``
(``backbone.encoder.layer.0.attention.self.query.lora_A.default.weight``,
``backbone.encoder.layer.0.output.dense.adapter_up.weight``, ``head.weight``).

Graph ``model``: inputs ``input_ids``, ``attention_mask`` (batch, sequence) int64, ``labels``
(batch,) int64 and every trainable; outputs ``logits`` (batch, num_labels), ``loss`` (batch,)
per-sample cross-entropy and ``features`` (batch, hidden), the pooled features, so a device
can fit the head forward-only before perturbing anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fwdfleet.errors import ExportError
from fwdfleet.export.adapters import ADAPTER_FAMILIES, AdapterSettings
from fwdfleet.export.hf import (
    ENCODER_FAMILIES,
    ENCODER_METHODS,
    LoraSettings,
    apply_peft_record,
    check_family,
    check_model_folder,
    load_fast_tokenizer,
    load_pretrained,
    peft_record,
)
from fwdfleet.export.kinds import ExportResult
from fwdfleet.export.onnx_graph import GraphOptions, TracedKind, TracedModel, TrainablesAsInputs, example_token_batch

POOLINGS = ("mean", "cls")
DATA_INPUTS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class SeqClsExport:
    """What to export. ``labels`` are the class names (their count is the head's width)."""

    source: Path
    labels: tuple[str, ...]
    method: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    pooling: str = "mean"
    max_length: int = 128
    quantize: str | None = None
    graph: GraphOptions = field(default_factory=GraphOptions)
    seed: int = 0
    random_init: bool = False
    verify: bool = True

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ExportError(f"SeqClsExport.labels needs at least 2 class names, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ExportError(f"SeqClsExport.labels has duplicates: {list(self.labels)}")
        if self.method not in ENCODER_METHODS:
            raise ExportError(f"SeqClsExport.method must be one of {ENCODER_METHODS}, got {self.method!r}")
        if self.pooling not in POOLINGS:
            raise ExportError(f"SeqClsExport.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self.graph.check_lengths("SeqClsExport", self.max_length)


class SequenceClassifier(nn.Module):
    """Encoder + pooling + linear head; ``forward`` returns (logits, per-sample loss, features)."""

    def __init__(self, backbone: nn.Module, hidden: int, num_labels: int, pooling: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden, num_labels)
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            features = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            features = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.head(features)
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        return logits, loss, features


def build_model(settings: Mapping[str, Any]) -> tuple[SequenceClassifier, tuple[str, ...]]:
    """Rebuild the torch model recorded in ``manifest.settings`` (used by export and the twin)."""
    folder = Path(settings["source"])
    backbone = load_pretrained(folder, causal=False, random_init=bool(settings["random_init"]),
                               seed=int(settings["seed"]))
    if getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None  # unused by mean/CLS pooling; BitFit must not train its bias
    apply_peft_record(backbone, settings["peft"], ENCODER_FAMILIES[settings["model_type"]], int(settings["seed"]))
    torch.manual_seed(int(settings["seed"]) + 1)
    head = settings["head"]
    model = SequenceClassifier(backbone, int(head["in_features"]), int(head["out_features"]),
                               str(settings["pooling"]))
    model.eval()
    names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    return model, names


def _settings(cfg: SeqClsExport, folder: Path, hf_config: Mapping[str, Any]) -> dict[str, Any]:
    hidden = hf_config.get("hidden_size", hf_config.get("dim"))
    if not isinstance(hidden, int):
        raise ExportError(f"{folder}/config.json has no hidden_size; is it an encoder model?")
    max_pos = hf_config.get("max_position_embeddings")
    if isinstance(max_pos, int) and cfg.max_length > max_pos:
        raise ExportError(f"--max-length {cfg.max_length} exceeds the model's max_position_embeddings {max_pos}")
    model_type = str(hf_config["model_type"])
    if "adapter" in cfg.method.split("+") and model_type not in ADAPTER_FAMILIES:
        raise ExportError(
            f"--method {cfg.method} is not supported for {model_type!r}: bottleneck adapters need "
            f"BERT-style output modules ({', '.join(sorted(ADAPTER_FAMILIES))}); use --method lora or bitfit"
        )
    peft = peft_record(cfg.method, cfg.lora, ENCODER_FAMILIES[model_type], adapter=cfg.adapter,
                       model_type=model_type)
    return {
        "source": str(folder), "model_type": hf_config["model_type"], "random_init": cfg.random_init,
        "seed": cfg.seed, "peft": peft, "pooling": cfg.pooling, "num_labels": len(cfg.labels),
        "max_length": cfg.max_length,
        "head": {"type": "linear", "in_features": hidden, "out_features": len(cfg.labels)},
    }


def example_batch(batch: int, seq: int, vocab: int, num_labels: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids (right padding in every other row) and labels."""
    labels = np.random.default_rng(seed + 1).integers(0, num_labels, size=(batch,), dtype=np.int64)
    return {**example_token_batch(batch, seq, vocab, 0, seed), "labels": labels}


class SeqClsKind(TracedKind):
    name = "seq_cls_lora"
    config_type = SeqClsExport

    def prepare(self, config: SeqClsExport) -> TracedModel:
        folder, hf_config = check_model_folder(config.source)
        check_family(str(hf_config["model_type"]), ENCODER_FAMILIES, "sequence classification", "seq-cls")
        tokenizer = load_fast_tokenizer(folder)
        settings = _settings(config, folder, hf_config)
        model, names = build_model(settings)
        initial = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in names}
        vocab = int(hf_config["vocab_size"])
        b, s = config.graph.batch_dim(), config.graph.sequence_dim()
        n = len(config.labels)
        return TracedModel(
            wrapper=TrainablesAsInputs(model, names, DATA_INPUTS), initial=initial,
            data_specs={"input_ids": ((b, s), "int64"), "attention_mask": ((b, s), "int64"),
                        "labels": ((b,), "int64")},
            output_specs={"logits": ((b, n), "float32"), "loss": ((b,), "float32"),
                          "features": ((b, int(settings["head"]["in_features"])), "float32")},
            make_batch=lambda bb, ss, seed: example_batch(bb, ss, vocab, n, seed),
            max_length=config.max_length, tokenizer=tokenizer, labels=config.labels, settings=settings,
        )

    def rebuild(self, settings: Mapping[str, Any]) -> tuple[nn.Module, tuple[str, ...]]:
        return build_model(settings)


KIND = SeqClsKind()


def export_seq_cls(cfg: SeqClsExport, out: Path, *, overwrite: bool = False) -> ExportResult:
    """Export the classifier described by ``cfg`` as a bundle in ``out``."""
    return KIND.export(cfg, out, overwrite=overwrite)

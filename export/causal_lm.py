"""Kind ``causal_lm_lora``: a LoRA causal language model from a local Llama or GPT-2 folder.

Trainable: the LoRA A/B matrices (and/or the biases, BitFit), named as in
``CausalLanguageModel.named_parameters()`` (``lm.model.layers.0.self_attn.q_proj.lora_A.default.weight``).
A folder with ``config.json`` and a tokenizer but no weights exports with ``random_init``
(seeded): that is how tests and memory studies use tiny or TinyLlama-shaped random models.

Graph ``model``: inputs ``input_ids``, ``attention_mask`` (batch, sequence) int64 and every
trainable; outputs ``logits`` (batch, sequence, vocab) and ``loss`` (batch,): the mean
next-token cross-entropy of each sample over the positions whose target is not padding.
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
from fwdfleet.export.hf import (
    CAUSAL_LM_FAMILIES,
    PEFT_METHODS,
    LoraSettings,
    apply_peft_record,
    check_family,
    check_model_folder,
    load_fast_tokenizer,
    load_pretrained,
    peft_record,
)
from fwdfleet.export.kinds import ExportResult
from fwdfleet.export.onnx_graph import GraphOptions, TracedKind, TracedModel, TrainablesAsInputs

DATA_INPUTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class CausalLmExport:
    """What to export."""

    source: Path
    method: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_length: int = 256
    quantize: str | None = None
    graph: GraphOptions = field(default_factory=GraphOptions)
    seed: int = 0
    random_init: bool = False
    verify: bool = True

    def __post_init__(self) -> None:
        if self.method not in PEFT_METHODS:
            raise ExportError(f"CausalLmExport.method must be one of {PEFT_METHODS}, got {self.method!r}")
        if self.max_length < 2:
            raise ExportError(f"CausalLmExport.max_length must be >= 2, got {self.max_length}")
        if self.graph.sequence_length is not None and self.graph.sequence_length > self.max_length:
            raise ExportError("GraphOptions.sequence_length must not exceed CausalLmExport.max_length")


class CausalLanguageModel(nn.Module):
    """A causal LM whose ``forward`` returns (logits, per-sample mean next-token loss)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        targets = input_ids[:, 1:]
        weight = attention_mask[:, 1:].to(logits.dtype)
        token_loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        loss = (token_loss * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        return logits, loss


def build_model(settings: Mapping[str, Any]) -> tuple[CausalLanguageModel, tuple[str, ...]]:
    """Rebuild the torch model recorded in ``manifest.settings`` (used by export and the twin)."""
    lm = load_pretrained(Path(settings["source"]), causal=True, random_init=bool(settings["random_init"]),
                         seed=int(settings["seed"]))
    apply_peft_record(lm, settings["peft"], CAUSAL_LM_FAMILIES[settings["model_type"]], int(settings["seed"]))
    model = CausalLanguageModel(lm)
    model.eval()
    return model, tuple(n for n, p in model.named_parameters() if p.requires_grad)


def example_batch(batch: int, seq: int, vocab: int, pad_id: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids, right-padded with ``pad_id`` in every other row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch, 2):
        keep = max(2, seq - 2 - row)
        mask[row, keep:] = 0
        ids[row, keep:] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


class CausalLmKind(TracedKind):
    name = "causal_lm_lora"
    config_type = CausalLmExport

    def prepare(self, config: CausalLmExport) -> TracedModel:
        folder, hf_config = check_model_folder(config.source)
        model_type = str(hf_config["model_type"])
        check_family(model_type, CAUSAL_LM_FAMILIES, "causal language modelling", "causal-lm")
        tokenizer = load_fast_tokenizer(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
        max_pos = hf_config.get("max_position_embeddings", hf_config.get("n_positions"))
        if isinstance(max_pos, int) and config.max_length > max_pos:
            raise ExportError(f"--max-length {config.max_length} exceeds the model's {max_pos} positions")
        peft = peft_record(config.method, config.lora, CAUSAL_LM_FAMILIES[model_type])
        settings: dict[str, Any] = {
            "source": str(folder), "model_type": model_type, "random_init": config.random_init,
            "seed": config.seed, "peft": peft, "max_length": config.max_length,
            "pad_token_id": int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0,
        }
        model, names = build_model(settings)
        initial = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in names}
        vocab = int(hf_config["vocab_size"])
        pad_id = min(int(settings["pad_token_id"]), vocab - 1)
        b, s = config.graph.batch_dim(), config.graph.sequence_dim()
        return TracedModel(
            wrapper=TrainablesAsInputs(model, names, DATA_INPUTS), initial=initial,
            data_specs={"input_ids": ((b, s), "int64"), "attention_mask": ((b, s), "int64")},
            output_specs={"logits": ((b, s, vocab), "float32"), "loss": ((b,), "float32")},
            make_batch=lambda bb, ss, seed: example_batch(bb, ss, vocab, pad_id, seed),
            max_length=config.max_length, tokenizer=tokenizer, labels=(), settings=settings,
        )

    def rebuild(self, settings: Mapping[str, Any]) -> tuple[nn.Module, tuple[str, ...]]:
        return build_model(settings)


KIND = CausalLmKind()


def export_causal_lm(cfg: CausalLmExport, out: Path, *, overwrite: bool = False) -> ExportResult:
    """Export the causal LM described by ``cfg`` as a bundle in ``out``."""
    return KIND.export(cfg, out, overwrite=overwrite)

"""Kind ``causal_lm_lora``: a LoRA causal language model from a local Llama or GPT-2 folder.

Trainable: the LoRA A/B matrices (and/or the biases, BitFit), named as in
``CausalLanguageModel.named_parameters()`` (``lm.model.layers.0.self_attn.q_proj.lora_A.default.weight``).
A folder with ``config.json`` and a tokenizer but no weights exports with ``random_init``
(seeded): that is how tests and memory studies use tiny or TinyLlama-shaped random models.

The objective (``CausalLmExport.objective``) decides the graph ``model``; every variant takes
``input_ids``, ``attention_mask`` (batch, sequence) int64 and every trainable:

* ``lm``: outputs ``logits`` (batch, sequence, vocab) and ``loss`` (batch,): the mean next-token
  cross-entropy of each sample over the positions whose target is not padding;
* ``response`` (instruction tuning): one more input ``loss_mask`` (batch, sequence) int64, 1 on
  the response's tokens; the loss averages only over targets that are response tokens, so the
  prompt is context, never a target;
* ``prompted-cls`` (prompted classification, as MeZO poses tasks): one more input ``labels``
  (batch,); the text is rendered into ``template`` (its ``{text}`` slot) and the class is the
  label word that follows the rendered template. The LM head runs at that one position only: the
  outputs are ``logits`` (batch, classes), the label words' scores, ``loss`` (batch,), the
  cross-entropy over them, and ``next_token_logits`` (batch, vocab) for generation. Accuracy
  takes one forward.

**Split bundles** (``trainable_layers=N``, Llama family): LoRA goes into the top N decoder layers
only, and the bundle gets two more graphs. ``prefix`` (frozen, no trainables) maps ``input_ids``,
``attention_mask`` to ``hidden`` (batch, sequence, hidden size), the residual stream entering
layer L - N; ``suffix`` takes ``hidden`` (and ``input_ids`` where the objective's targets are
tokens) with the other data inputs and the trainables, and gives the outputs of ``model``. A
device runs ``prefix`` once per example and caches ``hidden``
(:mod:`fwdfleet.device_runtime.prefix_cache`); every perturbed forward then runs only the top N
layers. ``model`` stays the whole network for evaluation and generation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fwdfleet.device_runtime.data import TEXT_SLOT, PromptTemplate, pad_right
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
from fwdfleet.export.onnx_graph import (
    ExtraGraph,
    GraphOptions,
    TracedKind,
    TracedModel,
    TrainablesAsInputs,
    example_token_batch,
)

Objective = Literal["lm", "response", "prompted-cls"]
OBJECTIVES: tuple[Objective, ...] = ("lm", "response", "prompted-cls")
# fixed texts rendered into the template for the export-time parity check of prompted-cls bundles
PARITY_TEXTS = (
    "Stocks rallied on Wall Street after the central bank held interest rates steady.",
    "The home side scored twice in the second half to win the cup final.",
    "A new chip promises faster phones with longer battery life.",
)


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
    objective: Objective = "lm"
    template: str = ""  # prompted-cls: the prompt around the text, with one {text} slot
    label_words: tuple[str, ...] = ()  # prompted-cls: one word per class, each a single token
    labels: tuple[str, ...] = ()  # prompted-cls: class names (default: the label words, stripped)
    trainable_layers: int | None = None  # LoRA in the top N layers only, plus prefix/suffix graphs

    def __post_init__(self) -> None:
        if self.trainable_layers is not None:
            if self.trainable_layers < 1:
                raise ExportError(f"--trainable-layers must be >= 1, got {self.trainable_layers}")
            if self.method != "lora" or self.lora.layers is not None:
                raise ExportError("--trainable-layers places LoRA in the top layers: use --method lora "
                                  "without LoraSettings.layers")
        if self.objective not in OBJECTIVES:
            raise ExportError(f"CausalLmExport.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "prompted-cls":
            if self.template.count(TEXT_SLOT) != 1:
                raise ExportError(
                    f"the prompt template needs exactly one {TEXT_SLOT} slot where the text goes, and ends where "
                    f"the label word follows (e.g. 'Article: {TEXT_SLOT}\\nAnswer:'); got {self.template!r}"
                )
            if len(self.label_words) < 2:
                raise ExportError("prompted classification needs at least two label words (--label-words)")
            if self.labels and len(self.labels) != len(self.label_words):
                raise ExportError(f"{len(self.labels)} labels for {len(self.label_words)} label words")
        elif self.template or self.label_words:
            raise ExportError("--template and --label-words belong to --objective prompted-cls")
        if self.method not in PEFT_METHODS:
            raise ExportError(f"CausalLmExport.method must be one of {PEFT_METHODS}, got {self.method!r}")
        self.graph.check_lengths("CausalLmExport", self.max_length)


class CausalLanguageModel(nn.Module):
    """A causal LM whose ``forward`` returns (logits, per-sample mean next-token loss).

    With ``loss_mask`` (the ``response`` objective) only targets marked 1 count."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden is None:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        else:  # a split bundle's suffix: the residual stream from the prefix replaces the embeddings
            logits = self.lm(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).logits
        targets = input_ids[:, 1:]
        weight = attention_mask[:, 1:].to(logits.dtype)
        if loss_mask is not None:
            weight = weight * loss_mask[:, 1:].to(logits.dtype)
        token_loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        loss = (token_loss * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        return logits, loss


class PromptedClassifier(nn.Module):
    """Prompted classification: the label words' scores at the answer position (the last real token).

    ``forward`` returns (label-word logits (batch, classes), per-sample cross-entropy, next-token
    logits (batch, vocab)); the LM head runs at the answer position only."""

    def __init__(self, lm: Any, label_token_ids: tuple[int, ...]) -> None:
        super().__init__()
        self.lm = lm  # a transformers causal LM (get_decoder, get_output_embeddings)
        self.register_buffer("label_ids", torch.tensor(label_token_ids, dtype=torch.int64), persistent=False)

    def forward(self, attention_mask: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor | None = None,
                hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        base = self.lm.get_decoder()
        if hidden is None:
            hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        else:  # a split bundle's suffix
            hidden = base(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1  # right padding: the answer follows the last real token
        answer = hidden[torch.arange(hidden.shape[0]), last]  # (batch, hidden)
        next_token = self.lm.get_output_embeddings()(answer)  # (batch, vocab)
        scores = next_token.index_select(1, self.label_ids)
        loss = nn.functional.cross_entropy(scores, labels, reduction="none")
        return scores, loss, next_token


class LayerRange(nn.ModuleList):
    """Decoder layers ``start .. stop - 1`` of a model, registered under their own indices (so a
    parameter keeps the name it has in the whole model) and iterated like a short ModuleList."""

    def __init__(self, layers: nn.ModuleList, start: int, stop: int) -> None:
        super().__init__()
        for i in range(start, stop):
            self.add_module(str(i), layers[i])

    def __getitem__(self, idx: Any) -> Any:
        modules = list(self._modules.values())
        return nn.ModuleList(modules[idx]) if isinstance(idx, slice) else modules[idx]


def _view(module: nn.Module, **children: nn.Module) -> Any:
    """A shallow copy of ``module`` sharing every child and weight, with some children replaced."""
    new = copy.copy(module)
    new._modules = {**module._modules, **children}
    return new


class PrefixModel(nn.Module):
    """The frozen lower layers of a split bundle: token ids to the residual stream entering the
    first trainable layer (no final norm)."""

    def __init__(self, lm: Any, prefix_layers: int) -> None:
        super().__init__()
        base = lm.get_decoder()
        self.base = _view(base, layers=LayerRange(base.layers, 0, prefix_layers), norm=nn.Identity())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state,)


def suffix_lm(lm: Any, prefix_layers: int) -> Any:
    """``lm`` with only its top layers (shared modules): fed ``inputs_embeds`` = the prefix's output."""
    base = lm.get_decoder()
    top = _view(base, layers=LayerRange(base.layers, prefix_layers, len(base.layers)))
    return _view(lm, model=top)


def build_model(settings: Mapping[str, Any]) -> tuple[nn.Module, tuple[str, ...]]:
    """Rebuild the torch model recorded in ``manifest.settings`` (used by export and the twin)."""
    lm = load_pretrained(Path(settings["source"]), causal=True, random_init=bool(settings["random_init"]),
                         seed=int(settings["seed"]))
    apply_peft_record(lm, settings["peft"], CAUSAL_LM_FAMILIES[settings["model_type"]], int(settings["seed"]))
    model = objective_model(lm, settings)
    model.eval()
    return model, tuple(n for n, p in model.named_parameters() if p.requires_grad)


def objective_model(lm: Any, settings: Mapping[str, Any]) -> nn.Module:
    """``lm`` wrapped in the module of the bundle's objective."""
    if settings.get("objective", "lm") == "prompted-cls":
        return PromptedClassifier(lm, tuple(int(i) for i in settings["label_token_ids"]))
    return CausalLanguageModel(lm)


def label_token_ids(tokenizer: Any, words: tuple[str, ...]) -> tuple[int, ...]:
    """Each label word's one token id; a word that tokenizes to several tokens is an error."""
    ids = []
    for word in words:
        toks = tokenizer.encode(word, add_special_tokens=False)
        if len(toks) != 1:
            pieces = tokenizer.convert_ids_to_tokens(toks)
            raise ExportError(
                f"label word {word!r} is {len(toks)} tokens {pieces} for this tokenizer; prompted classification "
                "scores one token per class: choose words that are one token each (often with a leading space)"
            )
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise ExportError(f"label words {list(words)} share a token; choose words with distinct first tokens")
    return tuple(ids)


def render_prompts(tokenizer: Any, template: str, texts: tuple[str, ...], seq: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """The device's rendering (:class:`fwdfleet.device_runtime.data.PromptTemplate`), padded to ``seq``."""
    return pad_right(PromptTemplate(template).encode(tokenizer, texts, seq), seq, pad_id)


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
        lora = config.lora
        layers = int(hf_config.get("num_hidden_layers", 0))
        if config.trainable_layers is not None:
            if model_type != "llama":
                raise ExportError(f"--trainable-layers (a split bundle) supports the llama family, not {model_type!r}")
            if config.trainable_layers >= layers:
                raise ExportError(f"--trainable-layers {config.trainable_layers} leaves no frozen prefix: the model "
                                  f"has {layers} layers; choose fewer, or omit it to train LoRA in every layer")
            lora = replace(lora, layers=tuple(range(layers - config.trainable_layers, layers)))
        peft = peft_record(config.method, lora, CAUSAL_LM_FAMILIES[model_type])
        settings: dict[str, Any] = {
            "source": str(folder), "model_type": model_type, "random_init": config.random_init,
            "seed": config.seed, "peft": peft, "max_length": config.max_length,
            "pad_token_id": int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0,
            "objective": config.objective, "vocab_size": int(hf_config["vocab_size"]),
        }
        labels: tuple[str, ...] = ()
        if config.objective == "prompted-cls":
            settings["template"] = config.template
            settings["label_words"] = list(config.label_words)
            settings["label_token_ids"] = list(label_token_ids(tokenizer, config.label_words))
            labels = config.labels or tuple(w.strip() for w in config.label_words)
        model, names = build_model(settings)
        initial = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if n in names}
        vocab = int(hf_config["vocab_size"])
        pad_id = min(int(settings["pad_token_id"]), vocab - 1)
        b, s = config.graph.batch_dim(), config.graph.sequence_dim()
        data_specs: dict[str, tuple[tuple[Any, ...], str]] = {
            "input_ids": ((b, s), "int64"), "attention_mask": ((b, s), "int64")}
        output_specs: dict[str, tuple[tuple[Any, ...], str]]
        if config.objective == "prompted-cls":
            data_specs["labels"] = ((b,), "int64")
            output_specs = {"logits": ((b, len(labels)), "float32"), "loss": ((b,), "float32"),
                            "next_token_logits": ((b, vocab), "float32")}

            template_tokens = len(tokenizer.encode(config.template.replace(TEXT_SLOT, "")))

            def make_batch(bb: int, ss: int, seed: int) -> dict[str, np.ndarray]:
                """Real prompts (the template around fixed news sentences) where the template fits ``ss``."""
                texts = tuple(PARITY_TEXTS[i % len(PARITY_TEXTS)] for i in range(bb))
                rng = np.random.default_rng(seed)
                ids = (render_prompts(tokenizer, config.template, texts, ss, pad_id) if template_tokens < ss
                       else example_token_batch(bb, ss, vocab, pad_id, seed))
                return {**ids, "labels": rng.integers(0, len(labels), size=bb, dtype=np.int64)}
        else:
            output_specs = {"logits": ((b, s, vocab), "float32"), "loss": ((b,), "float32")}
            if config.objective == "response":
                data_specs["loss_mask"] = ((b, s), "int64")

            def make_batch(bb: int, ss: int, seed: int) -> dict[str, np.ndarray]:
                batch = example_token_batch(bb, ss, vocab, pad_id, seed)
                if config.objective == "response":  # the second half of each row is the response
                    batch["loss_mask"] = (np.arange(ss)[None, :] >= ss // 2).astype(np.int64).repeat(bb, 0)
                return batch
        wrapper = TrainablesAsInputs(model, names, tuple(data_specs))
        extra: tuple[ExtraGraph, ...] = ()
        if config.trainable_layers is not None:
            prefix_layers = layers - config.trainable_layers
            settings["split"] = {"prefix_layers": prefix_layers, "trainable_layers": config.trainable_layers,
                                 "prefix": "prefix", "suffix": "suffix", "features": "hidden"}
            extra = _split_graphs(model, names, prefix_layers, int(hf_config["hidden_size"]), data_specs,
                                  output_specs, make_batch, settings)
        return TracedModel(
            wrapper=wrapper, initial=initial, data_specs=data_specs, output_specs=output_specs,
            make_batch=make_batch, max_length=config.max_length, tokenizer=tokenizer, labels=labels,
            settings=settings, extra_graphs=extra,
        )

    def rebuild(self, settings: Mapping[str, Any]) -> tuple[nn.Module, tuple[str, ...]]:
        return build_model(settings)


def _split_graphs(model: Any, names: tuple[str, ...], prefix_layers: int, hidden_size: int,
                  data_specs: Mapping[str, tuple[tuple[Any, ...], str]],
                  output_specs: Mapping[str, tuple[tuple[Any, ...], str]],
                  make_batch: Any, settings: Mapping[str, Any]) -> tuple[ExtraGraph, ExtraGraph]:
    """The ``prefix`` and ``suffix`` graphs of a split bundle, sharing ``model``'s modules."""
    b, s = data_specs["input_ids"][0]
    prefix = PrefixModel(model.lm, prefix_layers)
    prefix.eval()
    suffix = objective_model(suffix_lm(model.lm, prefix_layers), settings)
    suffix.eval()
    token_inputs = ("input_ids", "attention_mask")
    # the suffix needs token ids only where the objective's targets are tokens (lm, response)
    suffix_data = {"hidden": ((b, s, hidden_size), "float32"),
                   **{k: v for k, v in data_specs.items() if k != "input_ids" or "labels" not in data_specs}}

    def prefix_batch(bb: int, ss: int, seed: int) -> dict[str, np.ndarray]:
        return {k: v for k, v in make_batch(bb, ss, seed).items() if k in token_inputs}

    def suffix_batch(bb: int, ss: int, seed: int) -> dict[str, np.ndarray]:
        batch = make_batch(bb, ss, seed)
        with torch.no_grad():
            (hidden,) = prefix(**{k: torch.from_numpy(batch[k]) for k in token_inputs})
        return {"hidden": hidden.numpy(), **{k: v for k, v in batch.items() if k in suffix_data}}

    return (
        ExtraGraph("prefix", TrainablesAsInputs(prefix, (), token_inputs), {k: data_specs[k] for k in token_inputs},
                   {"hidden": ((b, s, hidden_size), "float32")}, prefix_batch),
        ExtraGraph("suffix", TrainablesAsInputs(suffix, names, tuple(suffix_data), shared=True), suffix_data,
                   output_specs, suffix_batch),
    )


KIND = CausalLmKind()


def export_causal_lm(cfg: CausalLmExport, out: Path, *, overwrite: bool = False) -> ExportResult:
    """Export the causal LM described by ``cfg`` as a bundle in ``out``."""
    return KIND.export(cfg, out, overwrite=overwrite)

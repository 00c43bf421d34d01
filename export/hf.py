"""Local Hugging Face model folders: check them, load them offline, ship their tokenizer.

Everything that can go wrong with a user's folder (it does not exist, it is not a Hugging Face
folder, its architecture is not one we export, it has no weights, its tokenizer is not a fast
one) becomes an :class:`~fwdfleet.errors.ExportError` that says what to do. Nothing is ever
downloaded: ``HF_HUB_OFFLINE`` is set before transformers is imported.

torch and transformers are imported lazily so that the command line can say which extra to
install when they are missing (:func:`require_export_extra`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fwdfleet.errors import ExportError
from fwdfleet.export.gguf import from_pretrained_args, gguf_architecture, is_gguf, quiet_dequantization
from fwdfleet.export.kinds import EXPORT_EXTRA_HINT, TORCH_EXPORT_MODULES, require_modules

if TYPE_CHECKING:
    from fwdfleet.export.adapters import AdapterSettings


# model_type -> default LoRA target modules. A registry, not an if-chain: adding a family that
# exports cleanly is one line here (and a tiny-config test).
ENCODER_FAMILIES: Mapping[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
}
# model_type -> (IA3 target modules, the feed-forward ones among them), as full-match regexes:
# keys, values and the feed-forward output projection (whose input is rescaled), as in the paper.
_BERT_IA3 = (r".*\.(key|value|layer\.\d+\.output\.dense)$", r".*\.layer\.\d+\.output\.dense$")
IA3_FAMILIES: Mapping[str, tuple[str, str]] = {
    "bert": _BERT_IA3,
    "roberta": _BERT_IA3,
    "xlm-roberta": _BERT_IA3,
    "electra": _BERT_IA3,
    "distilbert": (r".*\.(k_lin|v_lin|ffn\.lin2)$", r".*\.ffn\.lin2$"),
}
CAUSAL_LM_FAMILIES: Mapping[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_DIR = "tokenizer"


def require_export_extra() -> None:
    """Raise a one-line ExportError naming the install command if the export extra is missing."""
    require_modules(TORCH_EXPORT_MODULES, EXPORT_EXTRA_HINT)


def check_model_folder(folder: str | Path) -> tuple[Path, dict[str, Any]]:
    """Return the folder and its ``config.json`` after checking it is a Hugging Face model folder.

    A ``.gguf`` file (:mod:`fwdfleet.export.gguf`) is accepted too: its header is checked and its
    configuration read the way transformers reads it."""
    path = Path(folder).expanduser()
    if is_gguf(path):
        gguf_architecture(path)
        try:
            config = _transformers().AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except (OSError, ValueError, KeyError) as e:
            raise ExportError(f"cannot read the model configuration of {path}: {str(e).splitlines()[0]}") from e
        return path.resolve(), config.to_dict()
    if not path.exists():
        raise ExportError(f"model folder not found: {path}; pass a local folder written by save_pretrained")
    if not path.is_dir():
        raise ExportError(f"{path} is a file, not a model folder; pass the folder that holds config.json")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ExportError(
            f"{path} is not a Hugging Face model folder (no config.json); pass the folder that holds "
            "config.json, the weights and the tokenizer (e.g. the output of save_pretrained)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{cfg_file} is not valid JSON ({e}); re-save the model with save_pretrained") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ExportError(f"{cfg_file} has no model_type; re-save the model with a recent transformers")
    return path.resolve(), cfg


def check_family(model_type: str, families: Mapping[str, tuple[str, ...]], what: str, command: str) -> None:
    if model_type not in families:
        raise ExportError(
            f"unsupported architecture {model_type!r} for {what}; `fwdfleet export {command}` supports "
            f"{', '.join(sorted(families))}"
        )


def has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in WEIGHT_FILES)


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    tf: Any = transformers
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    return tf


def load_pretrained(folder: Path, *, causal: bool, random_init: bool, seed: int) -> Any:
    """Load the model of ``folder`` in float32 with eager attention (sdpa exports slower).

    With ``random_init`` the weights are drawn from ``seed`` (``config.json`` only is needed), so
    that the same settings always rebuild the same frozen weights.
    """
    import torch

    tf = _transformers()
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
    location, gguf = from_pretrained_args(folder)
    try:
        config = tf.AutoConfig.from_pretrained(location, local_files_only=True, **gguf)
        config._attn_implementation = "eager"
        if causal:
            config.use_cache = False
        if random_init:
            torch.manual_seed(seed)
            model = auto.from_config(config, attn_implementation="eager", torch_dtype=torch.float32)
        else:
            if not gguf and not has_weights(folder):
                raise ExportError(
                    f"{folder} has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                    "pass --random-init to export randomly initialised weights"
                )
            with quiet_dequantization(folder):
                model = auto.from_pretrained(
                    location, config=config, local_files_only=True, attn_implementation="eager",
                    torch_dtype=torch.float32, **gguf,
                )
    except ExportError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"cannot load the model in {folder}: {str(e).splitlines()[0]}") from e
    model.eval()
    return model


def load_fast_tokenizer(folder: Path) -> Any:
    """The folder's fast (``tokenizers``-backed) tokenizer; sentencepiece models are converted."""
    tf = _transformers()
    location, gguf = from_pretrained_args(folder)
    try:
        tok = tf.AutoTokenizer.from_pretrained(location, local_files_only=True, use_fast=True, **gguf)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise ExportError(
            f"cannot load a tokenizer from {folder} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "put tokenizer.json (or a sentencepiece tokenizer.model) beside config.json"
        ) from e
    if not getattr(tok, "is_fast", False):
        raise ExportError(
            f"the tokenizer in {folder} is not a fast tokenizer, so a device cannot run it without "
            "transformers; add tokenizer.json (save a PreTrainedTokenizerFast with save_pretrained)"
        )
    return tok


def save_tokenizer(tokenizer: Any, bundle_dir: Path) -> tuple[str, ...]:
    """Write the tokenizer into ``bundle_dir/tokenizer`` and return its files relative to the bundle.

    ``tokenizer.json`` is always among them, so a device can tokenize with the small
    ``tokenizers`` package alone.
    """
    out = bundle_dir / TOKENIZER_DIR
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer.save_pretrained(out)
    files = tuple(sorted(p.relative_to(bundle_dir).as_posix() for p in out.rglob("*") if p.is_file()))
    if f"{TOKENIZER_DIR}/tokenizer.json" not in files:
        raise ExportError("the tokenizer did not write tokenizer.json; use a fast tokenizer")
    return files


PEFT_METHODS = ("lora", "bitfit", "lora+bitfit")  # every family (encoders and causal LMs)
ADAPTER_METHODS = ("adapter", "adapter+bitfit")  # BERT-family encoders only (export/adapters.py)
ENCODER_METHODS = (*PEFT_METHODS, *ADAPTER_METHODS, "ia3")  # ia3: peft's (IA)^3, see IA3_FAMILIES


@dataclass(frozen=True)
class LoraSettings:
    """The ``peft`` LoRA configuration. ``target_modules=None`` takes the family's default."""

    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None  # decoder layers that get LoRA (None: all); peft's layers_to_transform

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ExportError(f"LoraSettings.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ExportError(f"LoraSettings.alpha must be > 0, got {self.alpha}")
        if self.target_modules is not None and not all(self.target_modules):
            raise ExportError("LoraSettings.target_modules must not contain empty names")


def adaptable_modules(model: Any) -> dict[str, str]:
    """Names of the modules LoRA can wrap (Linear, GPT-2's Conv1D) -> their class name."""
    from torch import nn

    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            out[name] = type(module).__name__
    return out


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def apply_peft(model: Any, method: str, lora: LoraSettings, default_targets: tuple[str, ...],
               seed: int, *, adapter: AdapterSettings | None = None,
               ia3: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Inject LoRA (seeded), bottleneck adapters or IA3 and/or mark biases trainable; freeze the rest.

    ``ia3`` holds the ``target_modules`` and ``feedforward_modules`` regexes (default: the
    model's family in :data:`IA3_FAMILIES`).

    Returns the JSON-able record of what was done (saved in ``manifest.settings``). Target
    modules that match nothing raise ExportError listing the names that would match; adapters
    on a model without BERT-style output modules raise ExportError naming the supported ones.
    """
    import torch

    if method not in ENCODER_METHODS:
        raise ExportError(f"method {method!r} is not one of {ENCODER_METHODS}")
    parts = method.split("+")
    for p in model.parameters():
        p.requires_grad_(False)
    record: dict[str, Any] = {"method": method}
    if "lora" in parts:
        from peft import LoraConfig, inject_adapter_in_model

        targets = tuple(lora.target_modules or default_targets)
        candidates = adaptable_modules(model)
        for t in targets:
            if not any(_matches(n, t) for n in candidates):
                leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
                raise ExportError(f"LoRA target module {t!r} matches no Linear layer of the model; "
                                  f"choose among {', '.join(leaves)}")
        fan_in_fan_out = any(candidates[n] == "Conv1D" for n in candidates
                             if any(_matches(n, t) for t in targets))
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(targets),
                            lora_dropout=0.0, bias="none", fan_in_fan_out=fan_in_fan_out,
                            layers_to_transform=list(lora.layers) if lora.layers is not None else None)
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        record["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(targets),
                          "fan_in_fan_out": fan_in_fan_out}
        if lora.layers is not None:
            record["lora"]["layers"] = list(lora.layers)
    if "ia3" in parts:
        record["ia3"] = _inject_ia3(model, ia3)
    if "adapter" in parts:
        from fwdfleet.export.adapters import AdapterSettings, inject_adapters

        settings = adapter or AdapterSettings()
        names = set(inject_adapters(model, settings, seed))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        record["adapter"] = settings.record()
    if "bitfit" in parts:
        for n, p in model.named_parameters():
            if n.endswith(".bias") and not n.startswith("pooler."):
                p.requires_grad_(True)
    model.eval()
    return record


def ia3_record(model_type: str) -> dict[str, str]:
    """The IA3 target regexes of ``model_type``; ExportError naming the supported families otherwise."""
    if model_type not in IA3_FAMILIES:
        raise ExportError(f"IA3 is not supported for {model_type!r}; it supports "
                          f"{', '.join(sorted(IA3_FAMILIES))}: use --method lora or bitfit")
    targets, feedforward = IA3_FAMILIES[model_type]
    return {"target_modules": targets, "feedforward_modules": feedforward}


def _inject_ia3(model: Any, ia3: Mapping[str, str] | None) -> dict[str, str]:
    from peft import IA3Config, inject_adapter_in_model

    record = dict(ia3) if ia3 else ia3_record(str(getattr(getattr(model, "config", None), "model_type", "")))
    config = IA3Config(target_modules=record["target_modules"], feedforward_modules=record["feedforward_modules"])
    try:
        inject_adapter_in_model(config, model)  # the scaling vectors start at one: the frozen model
    except ValueError as e:
        raise ExportError(f"IA3 targets {record['target_modules']!r} match no layer of the model "
                          f"({str(e).splitlines()[0][:120]})") from e
    for n, p in model.named_parameters():
        p.requires_grad_(".ia3_l." in n)
    if not any(p.requires_grad for p in model.parameters()):
        raise ExportError(f"IA3 targets {record['target_modules']!r} match no layer of the model")
    return record


def peft_record(method: str, lora: LoraSettings, default_targets: tuple[str, ...], *,
                adapter: AdapterSettings | None = None, model_type: str | None = None) -> dict[str, Any]:
    """The ``manifest.settings["peft"]`` entry for ``method``: what :func:`apply_peft_record` reads back."""
    record: dict[str, Any] = {"method": method}
    parts = method.split("+")
    if "lora" in parts:
        targets = lora.target_modules or default_targets
        record["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(targets)}
        if lora.layers is not None:
            record["lora"]["layers"] = list(lora.layers)
    if "adapter" in parts:
        from fwdfleet.export.adapters import AdapterSettings

        record["adapter"] = (adapter or AdapterSettings()).record()
    if "ia3" in parts:
        record["ia3"] = ia3_record(model_type or "")
    return record


def apply_peft_record(model: Any, record: Mapping[str, Any], default_targets: tuple[str, ...], seed: int) -> None:
    """:func:`apply_peft` as recorded in a manifest (export and the torch twin rebuild the same way)."""
    lora = record.get("lora") or {}
    adapter = None
    if record.get("adapter") is not None:
        from fwdfleet.export.adapters import AdapterSettings

        adapter = AdapterSettings.from_record(record["adapter"])
    apply_peft(model, record["method"],
               LoraSettings(rank=int(lora.get("rank", 8)), alpha=int(lora.get("alpha", 16)),
                            target_modules=tuple(lora["target_modules"]) if lora else None,
                            layers=tuple(int(i) for i in lora["layers"]) if lora.get("layers") is not None else None),
               default_targets, seed, adapter=adapter, ia3=record.get("ia3"))

"""The model a fleet run trains: an existing bundle, or a bundle exported for the run's data.

``[model] export`` names any kind of the export registry (:data:`fwdfleet.export.kinds.REGISTRY`),
by its manifest name (``ff_mlp``) or its command-line name (``ff-mlp``, ``seq-cls``,
``causal-lm``). The kind's config is built from what the data says and ``[model.options]``:
fields the data fixes are filled in by name (``layer_sizes`` / ``layers`` from the feature
count and ``[model] hidden``, ``num_classes`` and ``labels`` from the data's classes, ``seed``
from ``[fleet]``), every other field comes from ``[model.options]`` (nested tables for nested
settings, e.g. ``[model.options.lora]``), so a kind added to the registry runs without a change here.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from fwdfleet.bundle import Bundle, load_bundle
from fwdfleet.errors import ConfigError, ExportError, unknown_keys_error

# command-line names of the registry's kinds (fwdfleet export <name>)
ALIASES = {"ff-mlp": "ff_mlp", "seq-cls": "seq_cls_lora", "causal-lm": "causal_lm_lora"}


def kind_name(export: str) -> str:
    """The registry name of ``export`` (``seq-cls`` -> ``seq_cls_lora``); refuses an unknown kind."""
    from fwdfleet.export.kinds import REGISTRY

    name = ALIASES.get(export, export.replace("-", "_"))
    if name not in REGISTRY:
        known = sorted({*REGISTRY, *ALIASES})
        raise ConfigError(f"model.export {export!r} is not an export kind; choose one of {known}")
    return name


def build_dataclass(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)`` with TOML's types made the field's: lists as tuples, strings as paths,
    tables as nested config dataclasses; an unknown key names the nearest valid one."""
    init = {f.name for f in fields(cls) if f.init}
    error = unknown_keys_error(where, values, init)
    if error is not None:
        raise error
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        hint = hints.get(key)
        if isinstance(value, Mapping) and isinstance(hint, type) and is_dataclass(hint):
            value = build_dataclass(hint, value, f"{where[:-1]}.{key}]")
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, str) and (hint is Path or "Path" in str(hint)):
            value = Path(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ExportError) as e:
        raise ConfigError(f"{where}: {e}") from e


def export_for_data(export: str, options: Mapping[str, Any], hidden: tuple[int, ...], out: Path, *,
                    num_features: int, labels: tuple[str, ...], seed: int) -> Bundle:
    """Export a bundle of kind ``export`` sized for the data into ``out`` (replacing an earlier one)."""
    from fwdfleet.export.kinds import get_kind

    kind = get_kind(kind_name(export))
    names = {f.name for f in fields(kind.config_type) if f.init}
    fitted: dict[str, Any] = {}
    if "layer_sizes" in names:
        fitted["layer_sizes"] = (num_features, *hidden, len(labels))
    if "layers" in names:
        fitted["layers"] = (num_features, *hidden)
    if "num_classes" in names:
        fitted["num_classes"] = len(labels)
    if "labels" in names:
        fitted["labels"] = labels
    if "seed" in names:
        fitted["seed"] = seed
    config = build_dataclass(kind.config_type, {**fitted, **options}, "[model.options]")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    return load_bundle(kind.export(config, out).bundle.path)

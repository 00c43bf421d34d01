"""The frozen-prefix cache of a split bundle: run the frozen lower layers once per example.

A split bundle (``fwdfleet export causal-lm --trainable-layers N``) holds LoRA in its top N layers
only, a frozen ``prefix`` graph (token ids to the residual stream entering layer L - N) and a
``suffix`` graph (that stream plus the remaining data inputs and the trainables to the loss).
Nothing below the suffix changes while the trainables move, so a device computes the prefix once
per local example and keeps the result: every perturbed forward of training then costs only the
top N layers. :func:`cache_prefix` returns the cached examples as an :class:`ArrayDataset` whose
arrays are exactly the suffix graph's data inputs.

Every example is padded on the right to the longest example of the dataset, so the cache is one
array per input. With right padding and causal attention a real token never attends to a pad, so
an example's loss does not depend on the padding width. Memory: examples x width x hidden size x
4 bytes (600 examples of 64 tokens at hidden 576: 88 MB).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.data import ArrayDataset, Batch
from fwdfleet.device_runtime.session import BundleSession, SessionOptions
from fwdfleet.errors import BundleError


def split_graphs(bundle: Bundle) -> tuple[str, str, str] | None:
    """(prefix graph, suffix graph, feature input) of a split bundle; None for any other bundle."""
    split = bundle.manifest.settings.get("split")
    if not isinstance(split, Mapping):
        return None
    names = {g.name for g in bundle.manifest.graphs}
    prefix, suffix, features = str(split["prefix"]), str(split["suffix"]), str(split["features"])
    if not {prefix, suffix} <= names:
        raise BundleError(f"bundle {bundle.path} declares a split but lacks graph {prefix!r} or {suffix!r}")
    return prefix, suffix, features


def _pad_to(batch: Batch, width: int) -> Batch:
    """Right-pad the (batch, sequence) token arrays of ``batch`` with zeros to ``width`` (the
    attention mask is 0 there, so the padded ids are never read)."""
    out: Batch = {}
    for name, value in batch.items():
        if value.ndim == 2 and name in ("input_ids", "attention_mask", "loss_mask"):
            padded = np.zeros((value.shape[0], width), dtype=value.dtype)
            padded[:, : value.shape[1]] = value
            out[name] = padded
        else:
            out[name] = value
    return out


def cache_prefix(
    bundle: Bundle,
    dataset: Any,
    *,
    batch_size: int = 32,
    options: SessionOptions | None = None,
    session: BundleSession | None = None,
) -> ArrayDataset:
    """Run ``bundle``'s prefix graph over every example of ``dataset`` (the ``model`` graph's inputs,
    e.g. a :class:`~fwdfleet.device_runtime.data.TextDataset`) and return the suffix's inputs."""
    graphs = split_graphs(bundle)
    if graphs is None:
        raise BundleError(f"bundle {bundle.path} is not a split bundle (export it with --trainable-layers N)")
    prefix_name, suffix_name, feature = graphs
    prefix = session or BundleSession(bundle, options, graph=prefix_name)
    suffix_inputs = [t.name for t in bundle.manifest.graph(suffix_name).data_inputs]
    prefix_inputs = [t.name for t in prefix.graph.data_inputs]
    n = len(dataset)
    if n == 0:
        raise BundleError("cannot cache the prefix of an empty dataset")
    # every example, in order (a DeviceData's batch of its own size is all of it, in order), cut into
    # chunks of batch_size so that the prefix's activations stay small
    if hasattr(dataset, "batches"):
        batches = list(dataset.batches(batch_size))
    else:
        whole = dataset.batch(0, n)
        batches = [{k: v[i: i + batch_size] for k, v in whole.items()} for i in range(0, n, batch_size)]
    width = max(int(b["attention_mask"].shape[1]) for b in batches)
    parts: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in suffix_inputs}
    for batch in batches:
        batch = _pad_to(batch, width)
        hidden = prefix.run({}, {k: batch[k] for k in prefix_inputs}, (feature,))[feature]
        for name in suffix_inputs:
            parts[name].append(hidden if name == feature else batch[name])
    return ArrayDataset({name: np.concatenate(values) for name, values in parts.items()})

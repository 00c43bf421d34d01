"""A *stacked* graph: the bundle's loss at P points of the trainables in one onnxruntime call.

The bundle's ``model`` graph takes one value per trainable tensor, so each perturbed forward of
the device's estimator is one session call. ``add_stacked_graph`` adds a graph ``model_stack``
whose trainable inputs carry a leading axis of size P (``(P, *shape)``) and whose ``loss`` output
is ``(P, batch)``: the loss of the shared batch at each of the P points. The device's estimator
uses it when it is given a session on that graph (``device_runtime.estimator.estimate``): a task
of K central differences then costs ``ceil(2K / P)`` calls instead of 2K.

How it is built: the bundle's torch twin (``export.rebuild``), its trainables swapped for the
stacked inputs with ``torch.func.functional_call`` under ``torch.vmap``, exported with the dynamo
exporter. Parts of the graph that do not depend on a trainable (embeddings, frozen projections of
the input) are computed once, the rest is batched over the P points. Shapes are fixed (batch,
sequence length, P): this is for devices and NPUs that run one shape; the plain graph stays in the
bundle for everything else. Cost: P trainable-sized input buffers and P times the activations.
Measured speed: ``benchmarks/stacked_perturbations.py``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from fwdfleet.bundle import Bundle, GraphSpec, TensorSpec, load_bundle, write_bundle
from fwdfleet.errors import ExportError
from fwdfleet.export.rebuild import torch_twin_from_bundle

STACKED_GRAPH = "model_stack"


@dataclass(frozen=True)
class StackSettings:
    """The stacked graph's fixed shapes: ``points`` (P) per call, the batch and (token inputs) sequence length."""

    points: int
    batch_size: int
    sequence_length: int | None = None
    opset: int = 18

    def __post_init__(self) -> None:
        if self.points < 2:
            raise ExportError(f"StackSettings.points must be >= 2 (1 is the plain graph), got {self.points}")
        if self.batch_size < 1:
            raise ExportError(f"StackSettings.batch_size must be >= 1, got {self.batch_size}")
        if self.sequence_length is not None and self.sequence_length < 1:
            raise ExportError(f"StackSettings.sequence_length must be >= 1, got {self.sequence_length}")


class StackedLoss(torch.nn.Module):
    """``forward(*data, *stacked_trainables)`` -> per-point, per-sample loss ``(P, batch)``."""

    def __init__(self, twin: torch.nn.Module, data_names: tuple[str, ...], trainable_names: tuple[str, ...]) -> None:
        super().__init__()
        self.twin = twin
        self.data_names = data_names
        self.trainable_names = trainable_names
        self.prefix = "model." if isinstance(getattr(twin, "model", None), torch.nn.Module) else ""

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        data = dict(zip(self.data_names, args[: len(self.data_names)], strict=True))

        def one(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
            params = {self.prefix + n: v for n, v in zip(self.trainable_names, values, strict=True)}
            loss: torch.Tensor = functional_call(self.twin, params, (), data, strict=False)
            return loss

        out: torch.Tensor = torch.vmap(one)(tuple(args[len(self.data_names) :]))
        return out


def _fixed(spec: TensorSpec, s: StackSettings) -> TensorSpec:
    dims = {"batch": s.batch_size, "sequence": s.sequence_length}
    shape = []
    for d in spec.shape:
        value = dims.get(d) if isinstance(d, str) else d
        if value is None:
            raise ExportError(f"data input {spec.name!r} has a {d!r} axis: give --sequence-length")
        shape.append(value)
    return replace(spec, shape=tuple(shape))


def _example(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """Example data for the export and the parity check: token ids and labels 0/1, a full mask."""
    shape = tuple(int(d) for d in spec.shape)  # fixed by _fixed
    if spec.name == "attention_mask":
        return np.ones(shape, dtype=np.int64)
    if spec.dtype == "int64":
        return rng.integers(0, 2, size=shape).astype(np.int64)
    return rng.standard_normal(shape).astype(spec.dtype)


def add_stacked_graph(path: str | Path, settings: StackSettings) -> GraphSpec:
    """Add (or replace) graph ``model_stack`` in the bundle at ``path``; return its spec.

    Checks that the stacked graph's P losses equal P runs of the bundle's own graph (onnxruntime,
    random points around the bundle's values) before the manifest is rewritten."""
    bundle = load_bundle(path)
    plain = bundle.manifest.graph("model")
    names = tuple(t.name for t in bundle.manifest.trainables if t.name in plain.trainables)
    data = tuple(_fixed(t, settings) for t in plain.data_inputs)
    twin = torch_twin_from_bundle(bundle)
    module = StackedLoss(twin, tuple(t.name for t in data), names).eval()
    rng = np.random.default_rng(0)
    batch = {t.name: _example(t, rng) for t in data}
    values = bundle.load_trainables()
    specs = {t.name: t for t in bundle.manifest.trainables}
    stacked = {n: (values[n][None] + 0.01 * rng.standard_normal((settings.points, *values[n].shape)))
               .astype(np.float32) for n in names}  # fmt: skip
    file = f"{STACKED_GRAPH}.onnx"
    args = tuple(torch.from_numpy(batch[t.name]) for t in data) + tuple(torch.from_numpy(stacked[n]) for n in names)
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            torch.onnx.export(module, args, str(bundle.path / file), input_names=[*batch, *names],
                              output_names=["loss"], dynamo=True, opset_version=settings.opset)  # fmt: skip
    except Exception as e:  # the exporter raises many types; one line says what failed
        raise ExportError(f"cannot export a stacked graph for {bundle.manifest.kind!r}: "
                          f"{str(e).strip().splitlines()[0]}") from e  # fmt: skip
    spec = GraphSpec(
        name=STACKED_GRAPH, file=file,
        inputs=(*data, *(replace(specs[n], shape=(settings.points, *specs[n].shape)) for n in names)),
        outputs=(TensorSpec("loss", (settings.points, settings.batch_size), "float32"),),
        trainables=names,
    )  # fmt: skip
    _check_parity(bundle, file, batch, stacked, names)
    graphs = (*(g for g in bundle.manifest.graphs if g.name != STACKED_GRAPH), spec)
    write_bundle(bundle.path, replace(bundle.manifest, graphs=graphs), values)
    return spec


def _check_parity(bundle: Bundle, file: str, batch: dict[str, np.ndarray], stacked: dict[str, np.ndarray],
                  names: tuple[str, ...]) -> None:  # fmt: skip
    import onnxruntime as ort

    plain = ort.InferenceSession(str(bundle.graph_path("model")), providers=["CPUExecutionProvider"])
    together = ort.InferenceSession(str(bundle.path / file), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in together.get_inputs()}
    out: Any = together.run(["loss"], {k: v for k, v in {**batch, **stacked}.items() if k in wanted})[0]
    points = next(iter(stacked.values())).shape[0]
    for p in range(points):
        one: Any = plain.run(["loss"], {**batch, **{n: stacked[n][p] for n in names}})[0]
        diff = float(np.abs(np.asarray(one) - np.asarray(out)[p]).max())
        if not diff <= 1e-4:
            (bundle.path / file).unlink(missing_ok=True)
            raise ExportError(f"the stacked graph's loss at point {p} differs from the bundle's graph by {diff:.2e}")

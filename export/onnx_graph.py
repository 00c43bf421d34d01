"""torch -> ONNX with every trainable tensor as a named graph input.

The **parameter swap** (DESIGN.md): each trainable parameter is deleted from its module and, on
every forward, the matching input tensor is assigned in its place. The traced graph then reads
the trainable from a graph input instead of an initializer, so a device perturbs it by feeding
a different value. It works with both torch exporters (``functional_call`` fails with the
legacy one).

Exporter choice (torch 2.13 here): ``dynamo`` is the default. The legacy TorchScript tracer
exports faster (MiniLM: ~2 s against ~15 s) but bakes shape-dependent Python arithmetic into
constants: a tiny GPT-2 traced at (2, 12) returned logits off by 0.26 at (3, 20) with padding,
silently. ``torch.export`` keeps those shapes symbolic and matched torch at every shape we
tried. Every export is checked against torch at a shape other than the traced one
(:func:`check_parity`), so a mis-traced graph fails the export instead of reaching a device.

Graphs under 2 GB are written as one ``model.onnx``; larger ones as ``model.onnx`` plus exactly
one ``model.onnx.data`` (the exporters otherwise leave one file per tensor, or a data file
beside a small graph).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from fwdfleet.bundle import (
    MANIFEST_FILE,
    Bundle,
    BundleManifest,
    GraphSpec,
    TensorSpec,
    TokenizerSpec,
    load_bundle,
    write_bundle,
)
from fwdfleet.errors import ExportError

Exporter = Literal["dynamo", "legacy"]
EXPORTERS: tuple[Exporter, ...] = ("dynamo", "legacy")
TWO_GB = 2 * 1024**3
EXTERNAL_DATA_MARGIN = 64 * 1024**2  # protobuf's hard limit includes the graph itself
Dim = int | str


@dataclass(frozen=True)
class GraphOptions:
    """How the graph is exported. ``None`` batch/sequence sizes mean dynamic axes."""

    opset: int = 18
    batch_size: int | None = None
    sequence_length: int | None = None
    exporter: Exporter = "dynamo"

    def __post_init__(self) -> None:
        if not 14 <= self.opset <= 23:
            raise ExportError(f"GraphOptions.opset must be between 14 and 23, got {self.opset}")
        for name in ("batch_size", "sequence_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ExportError(f"GraphOptions.{name} must be >= 1 or None (dynamic), got {v}")
        if self.exporter not in EXPORTERS:
            raise ExportError(f"GraphOptions.exporter must be one of {EXPORTERS}, got {self.exporter!r}")

    def batch_dim(self) -> Dim:
        return "batch" if self.batch_size is None else self.batch_size

    def sequence_dim(self) -> Dim:
        return "sequence" if self.sequence_length is None else self.sequence_length


class TrainablesAsInputs(nn.Module):
    """Wrap ``model`` so that its trainable parameters are forward arguments (parameter swap).

    ``forward(data, trainables)`` takes the data tensors in ``data_names`` order and the
    trainables in ``trainable_names`` order, and returns ``model(**data)``. The wrapped model's
    parameters named in ``trainable_names`` are removed: the wrapper consumes the model.
    """

    def __init__(self, model: nn.Module, trainable_names: Sequence[str], data_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.trainable_names = tuple(trainable_names)
        self.data_names = tuple(data_names)
        self._slots: list[tuple[nn.Module, str]] = []
        for name in self.trainable_names:
            path, _, attr = name.rpartition(".")
            module = model.get_submodule(path)
            param = getattr(module, attr)
            if not isinstance(param, nn.Parameter):
                raise ExportError(f"trainable {name!r} is not a parameter of the model")
            delattr(module, attr)
            setattr(module, attr, param.detach())
            self._slots.append((module, attr))

    def forward(self, data: list[torch.Tensor], trainables: list[torch.Tensor]) -> Any:
        for (module, attr), value in zip(self._slots, trainables, strict=True):
            setattr(module, attr, value)
        return self.model(**dict(zip(self.data_names, data, strict=True)))


def export_graph(
    wrapper: TrainablesAsInputs,
    data: Mapping[str, torch.Tensor],
    trainables: Mapping[str, torch.Tensor],
    out_file: Path,
    *,
    data_shapes: Mapping[str, Sequence[Dim]],
    output_shapes: Mapping[str, Sequence[Dim]],
    options: GraphOptions,
) -> list[Path]:
    """Export ``wrapper`` to ``out_file`` and return the files written (graph, maybe one data file).

    ``data_shapes``/``output_shapes`` give each data input's and output's shape with symbolic
    names (``"batch"``, ``"sequence"``) for dynamic axes; they are also written into the graph.
    """
    data_list = [data[n] for n in wrapper.data_names]
    train_list = [trainables[n] for n in wrapper.trainable_names]
    input_names = [*wrapper.data_names, *wrapper.trainable_names]
    output_names = list(output_shapes)
    wrapper.eval()
    with tempfile.TemporaryDirectory(prefix="fwdfleet-export-") as tmp, warnings.catch_warnings():
        # the parameter swap assigns plain tensors to module attributes on purpose, and the
        # exporters' deprecation chatter is not actionable for a user: keep the output clean
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        if options.exporter == "dynamo":
            dims: dict[str, Any] = {}
            data_dyn = []
            for n in wrapper.data_names:
                spec = {i: dims.setdefault(d, torch.export.Dim(d)) for i, d in enumerate(data_shapes[n])
                        if isinstance(d, str)}
                data_dyn.append(spec or None)
            torch.onnx.export(
                wrapper, (data_list, train_list), str(raw), input_names=input_names,
                output_names=output_names, opset_version=options.opset, dynamo=True,
                dynamic_shapes={"data": data_dyn, "trainables": [None] * len(train_list)},
                external_data=True, verbose=False,
            )
        else:
            axes = {n: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
                    for n, shape in {**data_shapes, **output_shapes}.items()}
            torch.onnx.export(
                wrapper, (data_list, train_list), str(raw), input_names=input_names,
                output_names=output_names, opset_version=options.opset, dynamo=False,
                dynamic_axes={n: a for n, a in axes.items() if a},
            )
        model = onnx.load(str(raw))  # loads external data written beside the graph
    check_trainable_inputs(model, wrapper.trainable_names)
    name_dims(model, {**data_shapes, **output_shapes})
    return save_model(model, out_file)


def check_trainable_inputs(model: onnx.ModelProto, trainable_names: Sequence[str]) -> None:
    """Every trainable must be a graph input and not an initializer (or it cannot be perturbed)."""
    inputs = {i.name for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    missing = [n for n in trainable_names if n not in inputs]
    folded = [n for n in trainable_names if n in inits]
    if missing or folded:
        raise ExportError(
            f"trainables not exported as graph inputs: missing {missing[:3]}, folded into weights "
            f"{folded[:3]}; a trainable the model does not use cannot be trained, drop it"
        )


def name_dims(model: onnx.ModelProto, shapes: Mapping[str, Sequence[Dim]]) -> None:
    """Write the given shapes (ints fixed, strings symbolic) on the graph's inputs and outputs."""
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name not in shapes:
            continue
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for d in shapes[vi.name]:
            dim = shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = int(d)


def tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def save_model(model: onnx.ModelProto, out_file: Path) -> list[Path]:
    """One file under 2 GB; above, the graph plus exactly one ``<name>.data`` file beside it."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    data_file = out_file.with_name(out_file.name + ".data")
    if data_file.exists():
        data_file.unlink()
    if tensor_bytes(model) < TWO_GB - EXTERNAL_DATA_MARGIN:
        onnx.save_model(model, str(out_file))
        return [out_file]
    onnx.save_model(
        model, str(out_file), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data_file.name, size_threshold=1024,
    )
    return [out_file, data_file]


def check_parity(
    wrapper: TrainablesAsInputs,
    onnx_file: Path,
    data: Mapping[str, np.ndarray],
    trainables: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Run torch and onnxruntime on the same inputs; raise ExportError if any output differs.

    Returns the largest absolute difference per output.
    """
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = sess.run(list(outputs), {**data, **trainables})
    with torch.no_grad():
        ref = wrapper([torch.from_numpy(data[n]) for n in wrapper.data_names],
                      [torch.from_numpy(trainables[n]) for n in wrapper.trainable_names])
    diffs: dict[str, float] = {}
    for name, g, r in zip(outputs, got, ref, strict=True):
        r_np = r.numpy()
        if g.shape != r_np.shape:
            raise ExportError(f"exported graph gives {name} of shape {g.shape}, torch {r_np.shape}; "
                              "export with fixed --batch-size/--sequence-length or --exporter dynamo")
        diffs[name] = float(np.max(np.abs(g - r_np))) if g.size else 0.0
        if not np.allclose(g, r_np, rtol=rtol, atol=atol):
            raise ExportError(
                f"exported graph disagrees with torch on {name} (max abs diff {diffs[name]:.3g}) at "
                f"shape {tuple(data[wrapper.data_names[0]].shape)}; export with --exporter dynamo or "
                "fixed --batch-size/--sequence-length"
            )
    return diffs


@dataclass(frozen=True)
class ExportResult:
    """A written bundle and how its export went."""

    bundle: Bundle
    seconds: float
    parity: Mapping[str, float]  # max |onnxruntime - torch| per output, at parity_shape
    parity_shape: tuple[int, ...]

    def summary(self) -> dict[str, Any]:
        m = self.bundle.manifest
        files = sorted(p for p in self.bundle.path.rglob("*") if p.is_file())
        return {
            "bundle": str(self.bundle.path), "kind": m.kind, "quantization": m.quantization,
            "opset": m.opset, "exporter": m.settings.get("exporter"),
            "trainable_tensors": len(m.trainables), "trainable_values": m.num_trainable,
            "bundle_bytes": sum(p.stat().st_size for p in files), "export_seconds": round(self.seconds, 3),
            "parity_max_abs_diff": dict(self.parity), "parity_shape": list(self.parity_shape),
        }


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out} already exists and is not empty; pass --overwrite or choose another folder")
        if not (out / MANIFEST_FILE).is_file():
            raise ExportError(f"{out} is not a bundle; refusing to overwrite it, choose another folder")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def write_kind_bundle(
    *,
    kind: str,
    wrapper: TrainablesAsInputs,
    initial: Mapping[str, np.ndarray],
    out: Path,
    overwrite: bool,
    data_specs: Mapping[str, tuple[tuple[Dim, ...], str]],
    output_specs: Mapping[str, tuple[tuple[Dim, ...], str]],
    make_batch: Callable[[int, int, int], dict[str, np.ndarray]],
    max_length: int,
    graph: GraphOptions,
    quantize: str | None,
    verify: bool,
    tokenizer: Any,
    labels: Sequence[str],
    settings: Mapping[str, Any],
    seed: int,
    start: float,
) -> ExportResult:
    """Export the graph, check it against torch, quantize, ship the tokenizer, write the bundle.

    Written into ``<out>.partial`` and renamed at the end, so a failed export leaves no
    half-written bundle behind.
    """
    from fwdfleet.export.hf import save_tokenizer
    from fwdfleet.export.quantize import manifest_label, quantize_bundle_graph

    out = Path(out)
    if quantize is not None:
        manifest_label(quantize)  # validate before the slow part
    work = _prepare_out(out, overwrite)
    try:
        b = graph.batch_size or 2
        s = graph.sequence_length or min(16, max_length)
        data = make_batch(b, s, seed)
        export_graph(
            wrapper, {k: torch.from_numpy(v) for k, v in data.items()},
            {k: torch.from_numpy(v) for k, v in initial.items()}, work / "model.onnx",
            data_shapes={k: v[0] for k, v in data_specs.items()},
            output_shapes={k: v[0] for k, v in output_specs.items()}, options=graph,
        )
        parity: dict[str, float] = {}
        check_shape: tuple[int, ...] = ()
        if verify:  # at another shape than the traced one, with random non-zero trainables
            b2 = b if graph.batch_size else b + 1
            s2 = s if graph.sequence_length else min(max_length, s + 7)
            check = make_batch(b2, s2, seed + 1)
            rng = np.random.default_rng(seed + 2)
            noisy = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in initial.items()}
            parity = check_parity(wrapper, work / "model.onnx", check, noisy, list(output_specs))
            check_shape = (b2, s2)
        if quantize is not None:
            quantize_bundle_graph(work / "model.onnx", work / "model.q.onnx", quantize)
            (work / "model.onnx").unlink()
            for p in work.glob("model.q.onnx*"):
                p.rename(work / p.name.replace("model.q.onnx", "model.onnx"))
        tok_files = save_tokenizer(tokenizer, work)
        padding_side = str(getattr(tokenizer, "padding_side", "right"))
        trainable_specs = tuple(TensorSpec(n, tuple(v.shape), str(v.dtype)) for n, v in initial.items())
        manifest = BundleManifest(
            kind=kind,
            trainables=trainable_specs,
            graphs=(GraphSpec(
                name="model", file="model.onnx",
                inputs=(*(TensorSpec(n, shape, dt) for n, (shape, dt) in data_specs.items()), *trainable_specs),
                outputs=tuple(TensorSpec(n, shape, dt) for n, (shape, dt) in output_specs.items()),
                trainables=tuple(initial),
            ),),
            labels=tuple(labels),
            tokenizer=TokenizerSpec(files=tok_files, max_length=graph.sequence_length or max_length,
                                    padding_side=padding_side),
            quantization=manifest_label(quantize),
            opset=graph.opset,
            settings={**settings, "exporter": graph.exporter, "quantization_mode": quantize,
                      "batch_size": graph.batch_size, "sequence_length": graph.sequence_length},
        )
        write_bundle(work, manifest, initial)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportResult(load_bundle(out), time.perf_counter() - start, parity, check_shape)

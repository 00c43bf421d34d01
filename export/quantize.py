"""Quantize a bundle graph's frozen weights; trainable inputs stay float.

Modes (the first word is what ``manifest.quantization`` records):

* ``int8``: onnxruntime dynamic quantization of ``MatMul`` with a constant weight
  (``MatMulInteger``; activations are quantized on the fly). Smallest and fastest, but it
  makes the loss piecewise constant at small scales: finite differences need eps >= 1e-2
  (DESIGN.md measured 8% error at 1e-2, 73% at 1e-3).
* ``int8-weight``: weight-only 8-bit blocks (``MatMulNBits``, activations stay float). Finite
  differences stay within ~1% of fp32; the choice for perturbed training.
* ``int4-weight``: weight-only 4-bit blocks (``MatMulNBits``), for large causal LMs.

Only initializers are quantized. Nodes that read a trainable input are excluded explicitly, and
the result is checked: every graph input of the source is still an input of the same float type.
Works on any bundle graph (LoRA, Forward-Forward layers), so other exporters call
:func:`quantize_bundle_graph` too.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fwdfleet.errors import ExportError

MODES = ("int8", "int8-weight", "int4-weight")
BLOCK_SIZE = 32


def manifest_label(mode: str | None) -> str | None:
    """The value of ``BundleManifest.quantization`` for a mode (``None`` for fp32)."""
    if mode is None:
        return None
    check_mode(mode)
    return "int4" if mode == "int4-weight" else "int8"


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ExportError(f"quantization mode {mode!r} is not one of {MODES}")


def _graph_inputs(model: onnx.ModelProto) -> dict[str, int]:
    inits = {t.name for t in model.graph.initializer}
    return {i.name: i.type.tensor_type.elem_type for i in model.graph.input if i.name not in inits}


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(A, W, C)`` with constant ``W`` as ``MatMul`` (+ ``Add``) so it can be quantized.

    GPT-2's Conv1D and 2-D Linear layers export as Gemm, which the quantizers skip. Only plain
    Gemms (alpha = beta = 1, transA = 0) are rewritten; ``W`` is stored pre-transposed. Returns
    the number of rewritten nodes.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = inits[node.input[1]]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(weight).T.copy()
            weight.CopyFrom(numpy_helper.from_array(w, weight.name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [mm_out], name=node.name + "_mm"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_add"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def quantize_bundle_graph(src: Path, dst: Path, mode: str) -> None:
    """Quantize the graph ``src`` into ``dst`` (graph inputs, trainables included, stay as they are).

    ``dst`` is written like every bundle graph: one file under 2 GB, else the graph plus one
    ``.data`` file.
    """
    check_mode(mode)
    from fwdfleet.export.kinds import save_model

    source = onnx.load(str(src))
    with tempfile.TemporaryDirectory(prefix="fwdfleet-quant-") as tmp:
        if gemm_to_matmul(source):
            src = Path(tmp) / "gemm_free.onnx"
            save_model(source, src)
        _quantize(source, src, dst, mode)


def _quantize(source: onnx.ModelProto, src: Path, dst: Path, mode: str) -> None:
    from fwdfleet.export.kinds import EXTERNAL_DATA_MARGIN, TWO_GB, save_model, tensor_bytes

    inputs = _graph_inputs(source)
    float_inputs = {n for n, t in inputs.items() if t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    # nodes that read a float graph input directly (LoRA A/B, heads, FF weights) are never touched
    exclude = [n.name for n in source.graph.node if float_inputs.intersection(n.input)]
    large = tensor_bytes(source) >= TWO_GB - EXTERNAL_DATA_MARGIN
    for name in ("", "onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="fwdfleet-quant-") as tmp:
        out = Path(tmp) / "model.onnx"
        if mode == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(src), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                nodes_to_exclude=exclude, use_external_data_format=large,
                extra_options={"MatMulConstBOnly": True},
            )
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            bits = 8 if mode == "int8-weight" else 4
            cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, bits=bits)
            quantizer = MatMulNBitsQuantizer(source, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                             nodes_to_exclude=exclude, algo_config=cfg)
            quantizer.process()
            quantizer.model.save_model_to_file(str(out), use_external_data_format=large)
        result = onnx.load(str(out))
    after = _graph_inputs(result)
    changed = sorted(n for n, t in inputs.items() if after.get(n) != t)
    if changed:
        raise ExportError(f"quantization changed graph inputs {changed[:3]}; report this as a bug")
    if not any(n.op_type in ("MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul") for n in result.graph.node):
        raise ExportError("the graph has no MatMul/Gemm with constant weights to quantize; export it "
                          "without --quantize")
    save_model(result, dst)


def copy_other_files(bundle: Any, work: Path) -> None:
    """Copy every file of ``bundle`` but its graphs (and their ``.data``) and trainables into ``work``:
    the tokenizer and the rest, as they are, for a quantized variant of the bundle."""
    import shutil

    graph_files = {g.file for g in bundle.manifest.graphs}
    for rel in bundle.manifest.files:
        if rel not in graph_files and rel != bundle.manifest.trainables_file and not rel.endswith(".data"):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.path / rel, work / rel)


def quantize_bundle(bundle: Any, out: str | Path, mode: str, *, overwrite: bool = False) -> Path:
    """A copy of an fp32 ``bundle`` in ``out`` with every graph's frozen weights quantized (``mode``),
    the trainables and everything else unchanged: a quantized variant without re-exporting from torch.

    Written into ``<out>.partial`` and renamed at the end (nothing half-written on failure)."""
    from dataclasses import replace

    from fwdfleet.bundle import write_bundle
    from fwdfleet.export.kinds import bundle_folder

    label = manifest_label(mode)
    if bundle.manifest.quantization:
        raise ExportError(f"{bundle.path} is already quantized ({bundle.manifest.quantization}); start from fp32")
    out = Path(out)
    with bundle_folder(out, overwrite) as work:
        copy_other_files(bundle, work)
        for g in bundle.manifest.graphs:
            quantize_bundle_graph(bundle.path / g.file, work / g.file, mode)
        write_bundle(work, replace(bundle.manifest, quantization=label,
                                   settings={**bundle.manifest.settings, "quantization_mode": mode}),
                     bundle.load_trainables())
    return out


# ------------------------------------------------------------------------------ static QDQ (NPUs)
#
# NPU backends (Qualcomm HTP, Intel NPU) run integer graphs with fixed shapes: every tensor has a
# scale fixed before the first run. :func:`quantize_static_bundle` makes such a bundle from an
# existing one: the data inputs get fixed sizes, and onnxruntime's static quantizer inserts
# QuantizeLinear/DequantizeLinear pairs (QDQ) around every operator it supports, with weights
# (initializers) in 8 bits and activations in 8 or 16 bits, the scales calibrated on batches of
# the device's own data. The trainables stay float graph inputs: the device feeds w + eps z as
# before, and the graph quantizes it on entry with a calibrated scale. That scale is calibrated on
# perturbed points w + spread * z (not on w alone), so that a perturbation is not clipped; whether
# eps z survives the rounding is what ``fwdfleet device bench --fidelity`` measures.

STATIC_ACTIVATION_BITS = (8, 16)


@dataclass(frozen=True)
class StaticQuantConfig:
    """How to make a static-shape QDQ bundle (see :func:`quantize_static_bundle`).

    ``batch_size``/``sequence_length`` fix the symbolic dimensions ``batch``/``sequence`` of the
    data inputs (a text bundle needs ``sequence_length``). ``calibration_batches`` batches of the
    device's data, each seen at ``calibration_points`` trainable points (w itself, then w plus
    ``trainable_spread`` times a seeded Gaussian), calibrate the activation ranges.
    ``quantize_trainables=False`` leaves every operator that reads a trainable in float (on an
    integer-only NPU such operators run on the CPU instead).
    """

    activation_bits: int = 16
    batch_size: int = 16
    sequence_length: int | None = None
    calibration_batches: int = 8
    calibration_points: int = 4
    trainable_spread: float = 0.05
    quantize_trainables: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.activation_bits not in STATIC_ACTIVATION_BITS:
            raise ValueError(f"StaticQuantConfig.activation_bits must be one of {STATIC_ACTIVATION_BITS}, "
                             f"got {self.activation_bits}")
        if self.batch_size < 1 or self.calibration_batches < 1 or self.calibration_points < 1:
            raise ValueError("StaticQuantConfig.batch_size, calibration_batches and calibration_points must be >= 1")
        if self.sequence_length is not None and self.sequence_length < 1:
            raise ValueError("StaticQuantConfig.sequence_length must be >= 1 (or None for bundles without text)")
        if not self.trainable_spread >= 0:
            raise ValueError("StaticQuantConfig.trainable_spread must be >= 0")

    @property
    def label(self) -> str:
        """``manifest.quantization`` of the result: ``qdq-a16w8`` or ``qdq-a8w8``."""
        return f"qdq-a{self.activation_bits}w8"


def static_dims(config: StaticQuantConfig, spec: Any) -> tuple[int, ...]:
    """The fixed shape of a data input ``spec`` (a TensorSpec) under ``config``."""
    dims: list[int] = []
    for d in spec.shape:
        if isinstance(d, int):
            dims.append(d)
        elif d == "batch":
            dims.append(config.batch_size)
        elif d == "sequence" and config.sequence_length is not None:
            dims.append(config.sequence_length)
        else:
            hint = " (give --sequence-length)" if d == "sequence" else ""
            raise ExportError(f"data input {spec.name!r} has the symbolic dimension {d!r}, which a static bundle "
                              f"must fix{hint}")
    return tuple(dims)


def _static_output(config: StaticQuantConfig, shape: Sequence[int | str]) -> tuple[int | str, ...]:
    sizes: dict[str, int | None] = {"batch": config.batch_size, "sequence": config.sequence_length}
    return tuple(d if isinstance(d, int) else (sizes.get(d) or d) for d in shape)


def fix_shapes(model: onnx.ModelProto, fixed: dict[str, tuple[int, ...]]) -> None:
    """Give the graph inputs named in ``fixed`` those shapes and re-infer every other shape."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    params: dict[str, int] = {}
    for inp in model.graph.input:
        if inp.name not in fixed:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) != len(fixed[inp.name]):
            raise ExportError(f"graph input {inp.name!r} has rank {len(dims)}, not {len(fixed[inp.name])}")
        for dim, value in zip(dims, fixed[inp.name], strict=True):
            if dim.HasField("dim_param"):
                if params.setdefault(dim.dim_param, value) != value:
                    raise ExportError(f"dimension {dim.dim_param!r} would be fixed to both {params[dim.dim_param]} "
                                      f"and {value}")
            elif dim.dim_value != value:
                raise ExportError(f"graph input {inp.name!r} has size {dim.dim_value}, not {value}")
    for name, value in params.items():
        make_dim_param_fixed(model.graph, name, value)
    fix_output_shapes(model)
    left = [i.name for i in model.graph.input if any(d.HasField("dim_param") for d in i.type.tensor_type.shape.dim)]
    if left:
        raise ExportError(f"graph inputs {left} still have symbolic dimensions after fixing {sorted(params)}")


class _Calibration:
    """onnxruntime's CalibrationDataReader over fixed batches and perturbed trainable points."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibration_feeds(
    batches: Sequence[Mapping[str, np.ndarray]], trainables: Mapping[str, np.ndarray], config: StaticQuantConfig
) -> list[dict[str, np.ndarray]]:
    """Every batch at ``config.calibration_points`` trainable points: w, then w + spread * z (seeded)."""
    rng = np.random.default_rng(config.seed)
    feeds = []
    for batch in batches:
        for point in range(config.calibration_points):
            values = {k: (v if point == 0 else (v + config.trainable_spread * rng.standard_normal(v.shape)))
                      .astype(v.dtype) for k, v in trainables.items()}
            feeds.append({**batch, **values})
    return feeds


def quantize_static_graph(src: Path, dst: Path, fixed: dict[str, tuple[int, ...]],
                          feeds: Sequence[Mapping[str, np.ndarray]], config: StaticQuantConfig,
                          trainable_names: Sequence[str]) -> dict[str, Any]:
    """Fix the shapes of graph ``src``, quantize it statically (QDQ) and write it to ``dst``.

    Returns what was done: operator counts before and after, the number of QDQ pairs.
    """
    from onnxruntime.quantization import QuantType

    model = onnx.load(str(src))
    gemm_to_matmul(model)  # Gemm with a trainable weight input: MatMul + Add quantize like any other
    fix_shapes(model, fixed)
    inputs = _graph_inputs(model)
    ops_before = sorted({n.op_type for n in model.graph.node})
    for i, n in enumerate(model.graph.node):  # the quantizer needs names to exclude or report nodes
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    exclude = [] if config.quantize_trainables else \
        [n.name for n in model.graph.node if set(trainable_names).intersection(n.input)]
    activation = QuantType.QUInt16 if config.activation_bits == 16 else QuantType.QUInt8
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns through the root logger (non-constant biases, pre-processing)
    try:
        return _quantize_static(model, src, dst, feeds, config, exclude, activation, inputs, ops_before)
    finally:
        root.setLevel(level)


def _quantize_static(model: onnx.ModelProto, src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                     config: StaticQuantConfig, exclude: list[str], activation: Any, inputs: dict[str, int],
                     ops_before: list[str]) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from fwdfleet.export.kinds import save_model

    with tempfile.TemporaryDirectory(prefix="fwdfleet-qdq-") as tmp:
        fixed_file, out = Path(tmp) / "fixed.onnx", Path(tmp) / "qdq.onnx"
        onnx.save_model(model, str(fixed_file))
        try:
            # Every operator is quantized (the loss tail too): an integer NPU that meets one float
            # operator in the middle of a quantized graph may refuse the whole graph (QNN's HTP
            # does, at graph finalization), so the QNN-aware configuration serves every backend.
            qcfg = get_qnn_qdq_config(
                str(fixed_file), _Calibration([dict(f) for f in feeds]), calibrate_method=CalibrationMethod.MinMax,
                activation_type=activation, weight_type=QuantType.QUInt8, nodes_to_exclude=exclude or None,
            )
            quantize(str(fixed_file), str(out), qcfg)
        except Exception as e:  # onnxruntime raises its own types; say which graph and what to check
            raise ExportError(f"static quantization of {src.name} failed: {str(e).strip().splitlines()[0]}; "
                              "check that the calibration data fits the bundle's inputs") from e
        result = onnx.load(str(out))
    after = _graph_inputs(result)
    changed = sorted(n for n, t in inputs.items() if after.get(n) != t)
    if changed:
        raise ExportError(f"static quantization changed graph inputs {changed[:3]}; report this as a bug")
    pairs = sum(n.op_type == "QuantizeLinear" for n in result.graph.node)
    if pairs == 0:
        raise ExportError(f"static quantization of {src.name} inserted no QuantizeLinear node: nothing in the graph "
                          "is quantizable with these settings")
    save_model(result, dst)
    return {"quantize_linear_nodes": pairs, "ops_before": ops_before, "excluded_nodes": len(exclude)}


def quantize_static_bundle(bundle: Any, out: str | Path, config: StaticQuantConfig,
                           batches: Sequence[Mapping[str, np.ndarray]], *, overwrite: bool = False) -> Any:
    """Write a static-shape QDQ copy of ``bundle`` (a loaded :class:`~fwdfleet.bundle.Bundle`) to ``out``.

    ``batches`` are the device's data for the ``model`` graph, each of ``config.batch_size``
    examples (see :func:`calibration_batches`). Every graph of the bundle is quantized; graphs
    whose data inputs differ from ``model``'s are not supported. The manifest records
    ``quantization = config.label`` and, under ``settings["static_quantization"]``, the
    configuration and what each graph became. Returns the new bundle, loaded and verified.
    """
    from dataclasses import asdict, replace

    from fwdfleet.bundle import TensorSpec, load_bundle, write_bundle
    from fwdfleet.export.kinds import bundle_folder

    m = bundle.manifest
    if m.quantization is not None:
        raise ExportError(f"{bundle.path} is already quantized ({m.quantization}); make the static bundle from "
                          "the fp32 bundle")
    if not batches:
        raise ExportError("static quantization needs at least one calibration batch of the device's data")
    trainables = bundle.load_trainables()
    out = Path(out)
    with bundle_folder(out, overwrite) as work:
        graphs, report = [], {}
        for g in m.graphs:
            data = g.data_inputs
            fixed = {t.name: static_dims(config, t) for t in data}
            graph_batches = _ff_layer_batches(bundle, g.name, batches, trainables) or batches
            for t in data:
                for b in graph_batches:
                    if t.name not in b:
                        raise ExportError(f"calibration batch has no input {t.name!r} for graph {g.name!r}; "
                                          f"it has {sorted(b)}")
                    if tuple(b[t.name].shape) != fixed[t.name]:
                        raise ExportError(f"calibration input {t.name!r} has shape {list(b[t.name].shape)} but the "
                                          f"static graph {g.name!r} takes {list(fixed[t.name])}; give batches of "
                                          f"{config.batch_size} examples")
            own = {n: trainables[n] for n in g.trainables}
            feeds = calibration_feeds([{t.name: b[t.name] for t in data} for b in graph_batches], own, config)
            report[g.name] = quantize_static_graph(bundle.graph_path(g.name), work / g.file, fixed, feeds, config,
                                                   g.trainables)

            def static(t: Any, fixed: dict[str, tuple[int, ...]] = fixed) -> Any:
                return TensorSpec(t.name, fixed[t.name], t.dtype) if t.name in fixed else t

            outputs = tuple(TensorSpec(o.name, _static_output(config, o.shape), o.dtype) for o in g.outputs)
            graphs.append(replace(g, inputs=tuple(static(t) for t in g.inputs), outputs=outputs))
        copy_other_files(bundle, work)
        settings = dict(m.settings)
        settings["static_quantization"] = {**asdict(config), "label": config.label, "source": str(bundle.path),
                                           "calibration_examples": len(batches) * config.batch_size,
                                           "graphs": report}
        manifest = replace(m, graphs=tuple(graphs), quantization=config.label, settings=settings, files={})
        write_bundle(work, manifest, trainables)
    return load_bundle(out, verify=True)


def _ff_layer_batches(bundle: Any, graph: str, batches: Sequence[Mapping[str, np.ndarray]],
                      trainables: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]] | None:
    """For graph ``layer_i`` (i > 0) of a Forward-Forward bundle: its input ``x`` for each batch, the
    ``h`` of ``layer_{i-1}`` in fp32 on the batch (what it sees in training); None for any other graph."""
    if bundle.manifest.kind != "ff_mlp" or not graph.startswith("layer_") or graph == "layer_0":
        return None
    import onnxruntime as ort

    previous = f"layer_{int(graph.split('_')[1]) - 1}"
    inputs = _ff_layer_batches(bundle, previous, batches, trainables) or [dict(b) for b in batches]
    spec = bundle.manifest.graph(previous)
    session = ort.InferenceSession(str(bundle.graph_path(previous)), providers=["CPUExecutionProvider"])
    out = []
    for b in inputs:
        feed = {t.name: b[t.name] for t in spec.data_inputs} | {n: trainables[n] for n in spec.trainables}
        out.append({"x": np.asarray(session.run(["h"], feed)[0])})
    return out


def calibration_batches(dataset: Any, config: StaticQuantConfig) -> list[dict[str, np.ndarray]]:
    """``config.calibration_batches`` seeded batches of ``config.batch_size`` examples from a device dataset
    (:func:`fwdfleet.device_runtime.data.load_dataset`)."""
    if len(dataset) < config.batch_size:
        raise ExportError(f"the calibration data has {len(dataset)} examples, fewer than one static batch of "
                          f"{config.batch_size}; give more data or a smaller --batch-size")
    return [dict(dataset.batch(config.seed + i, config.batch_size)) for i in range(config.calibration_batches)]

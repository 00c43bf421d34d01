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
from pathlib import Path
from typing import Any

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


def quantize_bundle(bundle: Any, out: str | Path, mode: str, *, overwrite: bool = False) -> Path:
    """A copy of an fp32 ``bundle`` in ``out`` with every graph's frozen weights quantized (``mode``),
    the trainables and everything else unchanged: a quantized variant without re-exporting from torch.

    Written into ``<out>.partial`` and renamed at the end (nothing half-written on failure)."""
    import shutil
    from dataclasses import replace

    from fwdfleet.bundle import write_bundle
    from fwdfleet.export.kinds import prepare_out

    label = manifest_label(mode)
    if bundle.manifest.quantization:
        raise ExportError(f"{bundle.path} is already quantized ({bundle.manifest.quantization}); start from fp32")
    out = Path(out)
    work = prepare_out(out, overwrite)
    try:
        graph_files = {g.file for g in bundle.manifest.graphs}
        for rel in bundle.manifest.files:  # tokenizer and the rest as they are
            if rel not in graph_files and rel != bundle.manifest.trainables_file and not rel.endswith(".data"):
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle.path / rel, work / rel)
        for g in bundle.manifest.graphs:
            quantize_bundle_graph(bundle.path / g.file, work / g.file, mode)
        write_bundle(work, replace(bundle.manifest, quantization=label,
                                   settings={**bundle.manifest.settings, "quantization_mode": mode}),
                     bundle.load_trainables())
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out

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
tried. Every export is checked against torch at a shape other than the traced one (the parity
check of :func:`fwdfleet.export.kinds.export_bundle`, with :class:`TracedKind` as the
reference), so a mis-traced graph fails the export instead of reaching a device.

Graphs under 2 GB are written as one ``model.onnx``; larger ones as ``model.onnx`` plus exactly
one ``model.onnx.data`` (the exporters otherwise leave one file per tensor, or a data file
beside a small graph).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import torch
from torch import nn

from fwdfleet.bundle import Bundle, GraphSpec, TensorSpec, TokenizerSpec
from fwdfleet.errors import BundleError, ExportError
from fwdfleet.export.kinds import Built, ExportKind, ManifestExtras, Sample, perturbed, save_model

Exporter = Literal["dynamo", "legacy"]
EXPORTERS: tuple[Exporter, ...] = ("dynamo", "legacy")
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

    def check_lengths(self, owner: str, max_length: int) -> None:
        """A traced text kind's ``max_length`` against these options (``owner`` names the config)."""
        if max_length < 2:
            raise ExportError(f"{owner}.max_length must be >= 2, got {max_length}")
        if self.sequence_length is not None and self.sequence_length > max_length:
            raise ExportError(f"GraphOptions.sequence_length must not exceed {owner}.max_length")

    def batch_dim(self) -> Dim:
        return "batch" if self.batch_size is None else self.batch_size

    def sequence_dim(self) -> Dim:
        return "sequence" if self.sequence_length is None else self.sequence_length


class TrainablesAsInputs(nn.Module):
    """Wrap ``model`` so that its trainable parameters are forward arguments (parameter swap).

    ``forward(data, trainables)`` takes the data tensors in ``data_names`` order and the
    trainables in ``trainable_names`` order, and returns ``model(**data)``. The wrapped model's
    parameters named in ``trainable_names`` are removed: the wrapper consumes the model. With
    ``shared`` a second wrapper may take over trainables another wrapper already swapped out (graphs
    of one bundle that share modules, such as a split bundle's ``model`` and ``suffix``).
    """

    def __init__(self, model: nn.Module, trainable_names: Sequence[str], data_names: Sequence[str], *,
                 shared: bool = False) -> None:
        super().__init__()
        self.model = model
        self.trainable_names = tuple(trainable_names)
        self.data_names = tuple(data_names)
        self._slots: list[tuple[nn.Module, str]] = []
        for name in self.trainable_names:
            path, _, attr = name.rpartition(".")
            module = model.get_submodule(path)
            param = getattr(module, attr)
            if isinstance(param, nn.Parameter):
                delattr(module, attr)
                setattr(module, attr, param.detach())
            elif not (shared and isinstance(param, torch.Tensor)):
                raise ExportError(f"trainable {name!r} is not a parameter of the model")
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
        # nor is the dynamo exporter's note that torchvision (which no bundle uses) is not installed
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
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




def example_token_batch(batch: int, seq: int, vocab: int, pad_id: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids for a traced text kind's samples, right-padded with ``pad_id`` in every
    other row (so the attention mask is exercised)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(5, vocab - 1), vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch, 2):
        keep = max(2, seq - 2 - row)
        mask[row, keep:] = 0
        ids[row, keep:] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


@dataclass(frozen=True)
class TracedModel:
    """What a traced kind hands :class:`TracedKind`: the wrapped torch model and its graph's contract.

    ``data_specs``/``output_specs``: name -> (shape with symbolic dynamic axes, dtype);
    ``make_batch(batch, sequence, seed)`` draws example data inputs.
    """

    wrapper: TrainablesAsInputs
    initial: Mapping[str, np.ndarray]
    data_specs: Mapping[str, tuple[tuple[Dim, ...], str]]
    output_specs: Mapping[str, tuple[tuple[Dim, ...], str]]
    make_batch: Callable[[int, int, int], dict[str, np.ndarray]]
    max_length: int
    tokenizer: Any
    labels: tuple[str, ...]
    settings: Mapping[str, Any]
    extra_graphs: tuple[ExtraGraph, ...] = ()


@dataclass(frozen=True)
class ExtraGraph:
    """A further graph of a traced bundle (e.g. a split bundle's ``prefix`` and ``suffix``), traced
    and parity-checked like ``model``; its wrapper shares the main model's modules."""

    name: str
    wrapper: TrainablesAsInputs
    data_specs: Mapping[str, tuple[tuple[Dim, ...], str]]
    output_specs: Mapping[str, tuple[tuple[Dim, ...], str]]
    make_batch: Callable[[int, int, int], dict[str, np.ndarray]]


class LossTwin(nn.Module):
    """Wraps a model whose forward returns (logits, loss, ...) and returns only the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = self.model(**inputs)[1]
        return loss


def _graphs(t: TracedModel) -> tuple[ExtraGraph, ...]:
    """``model`` first, then the kind's further graphs."""
    return (ExtraGraph("model", t.wrapper, t.data_specs, t.output_specs, t.make_batch), *t.extra_graphs)


class TracedKind(ExportKind[Any]):
    """The parts shared by kinds traced from a Hugging Face model with torch (``seq_cls_lora``,
    ``causal_lm_lora``): build = trace at a small shape; samples = another shape with non-zero
    trainables; reference = the torch model itself. A subclass supplies :meth:`prepare` (the
    wrapped model) and :meth:`rebuild` (the model from ``manifest.settings``). Its config has
    ``graph``, ``seed``, ``quantize`` and ``verify``.
    """

    parity_hint: ClassVar[str] = "export with --exporter dynamo or fixed --batch-size/--sequence-length"

    def prepare(self, config: Any) -> TracedModel:
        raise NotImplementedError

    def rebuild(self, settings: Mapping[str, Any]) -> tuple[nn.Module, tuple[str, ...]]:
        raise NotImplementedError

    def build(self, config: Any, work: Path) -> Built:
        from fwdfleet.export.hf import save_tokenizer

        t = self.prepare(config)
        g: GraphOptions = config.graph
        specs = []
        for graph in _graphs(t):
            data = graph.make_batch(g.batch_size or 2, g.sequence_length or min(16, t.max_length), config.seed)
            names = graph.wrapper.trainable_names
            export_graph(
                graph.wrapper, {k: torch.from_numpy(v) for k, v in data.items()},
                {k: torch.from_numpy(t.initial[k]) for k in names}, work / f"{graph.name}.onnx",
                data_shapes={k: v[0] for k, v in graph.data_specs.items()},
                output_shapes={k: v[0] for k, v in graph.output_specs.items()}, options=g,
            )
            specs.append(GraphSpec(
                name=graph.name, file=f"{graph.name}.onnx",
                inputs=(*(TensorSpec(n, shape, dt) for n, (shape, dt) in graph.data_specs.items()),
                        *(TensorSpec(n, tuple(t.initial[n].shape), str(t.initial[n].dtype)) for n in names)),
                outputs=tuple(TensorSpec(n, shape, dt) for n, (shape, dt) in graph.output_specs.items()),
                trainables=names,
            ))
        tokenizer_files = save_tokenizer(t.tokenizer, work)
        return Built(tuple(specs), t.initial, g.opset, state=(t, tokenizer_files))

    def samples(self, config: Any, built: Built) -> list[Sample]:
        """One batch per graph at another shape than the traced one, with random non-zero trainables."""
        t: TracedModel = built.state[0]
        g: GraphOptions = config.graph
        b = g.batch_size or 3
        s = g.sequence_length or min(t.max_length, min(16, t.max_length) + 7)
        values = perturbed(t.initial, 0.05, config.seed + 2)
        return [Sample(graph.name, {**graph.make_batch(b, s, config.seed + 1),
                                    **{n: values[n] for n in graph.wrapper.trainable_names}})
                for graph in _graphs(t)]

    def reference(self, config: Any, built: Built, sample: Sample) -> list[np.ndarray]:
        t: TracedModel = built.state[0]
        w = next(graph.wrapper for graph in _graphs(t) if graph.name == sample.graph)
        with torch.no_grad():
            out = w([torch.from_numpy(np.asarray(sample.feeds[n])) for n in w.data_names],
                    [torch.from_numpy(np.asarray(sample.feeds[n])) for n in w.trainable_names])
        return [r.numpy() for r in out]

    def manifest_extras(self, config: Any, built: Built) -> ManifestExtras:
        t: TracedModel = built.state[0]
        g: GraphOptions = config.graph
        tokenizer = TokenizerSpec(files=built.state[1], max_length=g.sequence_length or t.max_length,
                                  padding_side=str(getattr(t.tokenizer, "padding_side", "right")))
        settings = {**t.settings, "exporter": g.exporter, "quantization_mode": config.quantize,
                    "batch_size": g.batch_size, "sequence_length": g.sequence_length}
        return ManifestExtras(labels=t.labels, settings=settings, tokenizer=tokenizer)

    def quantization(self, config: Any) -> str | None:
        mode: str | None = config.quantize
        return mode

    def verify(self, config: Any) -> bool:
        return bool(config.verify)

    def torch_twin(self, bundle: Bundle) -> nn.Module:
        """:meth:`rebuild` from the manifest, with the bundle's trainable values loaded."""
        model, _ = self.rebuild(bundle.manifest.settings)
        twin = LossTwin(model)
        values = bundle.load_trainables()
        params: dict[str, Any] = dict(model.named_parameters())
        missing = sorted(set(values) - set(params))
        if missing:
            raise BundleError(f"the rebuilt model has no parameters {missing[:3]}; was the source folder changed?")
        if {n for n, p in params.items() if p.requires_grad} != set(values):
            raise BundleError("the rebuilt model's trainable parameters differ from the bundle's; "
                              "was the source folder or the toolkit version changed?")
        with torch.no_grad():
            for name, value in values.items():
                if tuple(params[name].shape) != value.shape:
                    raise BundleError(f"trainable {name!r} has shape {value.shape} in the bundle but "
                                      f"{tuple(params[name].shape)} in the rebuilt model")
                params[name].copy_(torch.from_numpy(value))
        twin.eval()
        return twin

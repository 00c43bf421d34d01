"""Export kinds: one registry, every kind with the same parts, and the one bundle writer.

A *kind* is what ``manifest.kind`` names (``mlp``, ``ff_mlp``, ``seq_cls_lora``,
``causal_lm_lora``). Each is one :class:`ExportKind` object, ``KIND`` in its module, with
the same parts:

* ``config_type``: its frozen config dataclass (validated in ``__post_init__``);
* :meth:`~ExportKind.build`: write the graph file(s) into a work folder (trace with torch, or
  build with ``onnx.helper``) and return a :class:`Built`: graph specs, initial trainables;
* :meth:`~ExportKind.samples` and :meth:`~ExportKind.reference`: the export's sample inputs
  and an independent computation of every graph output on them (torch for traced kinds, numpy
  for graphs built by hand), the **parity reference**;
* :meth:`~ExportKind.manifest_extras`: labels, tokenizer and the kind's ``settings``.

:func:`export_bundle` is the only writer: it builds into ``<out>.partial``, runs the parity
check (onnxruntime against the reference on the samples, fp32 within the kind's tolerance, or
the export fails saying what to do), quantizes if the config asks (and measures, rather than
fails on, the quantized graph's deviation, recorded in the manifest and the summary), writes
manifest and trainables, and renames the folder into place.

The registry (:data:`REGISTRY`) maps a kind name to the module holding ``KIND`` and the
packages it needs, so the command line can look a kind up (and say what to install) without
importing torch. Adding a kind:

1. its name in ``fwdfleet.bundle.KINDS`` (the manifest contract);
2. a module with its frozen config dataclass and ``KIND = MyKind()``, ``MyKind`` subclassing
   :class:`ExportKind` (or :class:`fwdfleet.export.onnx_graph.TracedKind` for a model traced
   with torch, which supplies build/samples/reference/extras from a ``prepare`` hook);
3. one :func:`register_kind` line below (module path, the packages it needs, the install hint);
4. a subcommand in ``fwdfleet/cli/export_cmd.py`` whose defaults are ``func=run_export``,
   ``kind=<name>`` and ``make_config=<args -> config>``;
5. its tests (the parity check runs on every export, so a wrong graph already fails them).

This module needs numpy, onnx and onnxruntime only, never torch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from fwdfleet.bundle import (
    KINDS as BUNDLE_KINDS,
)
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

C = TypeVar("C")

TWO_GB = 2 * 1024**3
EXTERNAL_DATA_MARGIN = 64 * 1024**2  # protobuf's hard limit includes the graph itself
EXPORT_EXTRA_HINT = "pip install torch==2.13.0 && pip install 'fwdfleet[export]'"
TORCH_EXPORT_MODULES = ("torch", "transformers", "peft", "onnx", "onnxscript")


@dataclass(frozen=True)
class Sample:
    """One parity-check input: the graph it feeds and every input of it (data and trainables)."""

    graph: str
    feeds: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Built:
    """What :meth:`ExportKind.build` wrote: the graphs (files in the work folder) and initial values.

    ``state`` is the kind's own (e.g. the traced torch module its reference runs).
    """

    graphs: tuple[GraphSpec, ...]
    initial: Mapping[str, np.ndarray]
    opset: int
    state: Any = None

    @property
    def trainables(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(n, tuple(v.shape), str(v.dtype)) for n, v in self.initial.items())


@dataclass(frozen=True)
class ManifestExtras:
    """The manifest fields a kind decides besides graphs and trainables."""

    labels: tuple[str, ...]
    settings: Mapping[str, Any]
    tokenizer: TokenizerSpec | None = None


class ExportKind(Generic[C]):
    """One export kind (see the module doc). Subclasses set the class attributes and the four parts."""

    name: ClassVar[str]  # the manifest kind
    config_type: ClassVar[type]
    # fp32 parity tolerance (np.allclose) between onnxruntime and the reference
    rtol: ClassVar[float] = 1e-3
    atol: ClassVar[float] = 1e-4
    # what to do when the exported graph disagrees with the reference
    parity_hint: ClassVar[str] = "the graph builder of this kind is wrong: report it as a bug"

    def build(self, config: C, work: Path) -> Built:
        raise NotImplementedError

    def samples(self, config: C, built: Built) -> Sequence[Sample]:
        raise NotImplementedError

    def reference(self, config: C, built: Built, sample: Sample) -> Sequence[np.ndarray]:
        """The outputs of ``sample.graph`` on ``sample.feeds``, in the graph spec's output order."""
        raise NotImplementedError

    def manifest_extras(self, config: C, built: Built) -> ManifestExtras:
        raise NotImplementedError

    def quantization(self, config: C) -> str | None:
        """The quantization mode the config asks for (kinds without frozen weights: never)."""
        return None

    def verify(self, config: C) -> bool:
        """Whether to run the parity check (only traced kinds let a user skip it, for huge models)."""
        return True

    def torch_twin(self, bundle: Bundle) -> Any:
        """The bundle's model in torch; ``forward(**data)`` returns the per-sample loss (needs torch)."""
        raise ExportError(f"bundle kind {self.name!r} has no torch twin")

    def export(self, config: C, out: str | Path, *, overwrite: bool = False) -> ExportResult:
        return export_bundle(self, config, out, overwrite=overwrite)


@dataclass(frozen=True)
class KindEntry:
    """Where a kind lives and which packages it needs (checked before its module is imported)."""

    module: str
    requires: tuple[str, ...]
    install_hint: str


REGISTRY: dict[str, KindEntry] = {}


def register_kind(name: str, module: str, requires: tuple[str, ...] = ("onnx",),
                  install_hint: str = "pip install --upgrade fwdfleet") -> None:
    if name not in BUNDLE_KINDS:
        raise ExportError(f"cannot register export kind {name!r}: add it to fwdfleet.bundle.KINDS first")
    REGISTRY[name] = KindEntry(module, requires, install_hint)


register_kind("mlp", "fwdfleet.export.onnx_mlp")
register_kind("ff_mlp", "fwdfleet.export.ff_mlp")
register_kind("ff_cnn", "fwdfleet.export.ff_cnn", ("torch", "onnx", "onnxscript"), EXPORT_EXTRA_HINT)
register_kind("seq_cls_lora", "fwdfleet.export.seq_cls", TORCH_EXPORT_MODULES, EXPORT_EXTRA_HINT)
register_kind("causal_lm_lora", "fwdfleet.export.causal_lm", TORCH_EXPORT_MODULES, EXPORT_EXTRA_HINT)


def require_modules(modules: Sequence[str], hint: str) -> None:
    """Raise a one-line ExportError naming ``hint`` if one of ``modules`` is not installed."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ExportError(f"export needs {name!r}, which is not installed: {hint}")


def get_kind(name: str) -> ExportKind[Any]:
    """The registered kind ``name`` (its module imported after checking what it needs)."""
    if name not in REGISTRY:
        raise ExportError(f"no export kind {name!r}; known kinds: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    require_modules(entry.requires, entry.install_hint)
    kind: ExportKind[Any] = importlib.import_module(entry.module).KIND
    return kind


@dataclass(frozen=True)
class ExportResult:
    """A written bundle and how its export went."""

    bundle: Bundle
    seconds: float
    parity: Mapping[str, float]  # max |onnxruntime - reference| per output over the samples (fp32)
    parity_shape: tuple[int, ...]  # shape of the first sample's first data input
    quantized_parity: Mapping[str, float] = field(default_factory=dict)  # the same after quantization

    def summary(self) -> dict[str, Any]:
        m = self.bundle.manifest
        files = sorted(p for p in self.bundle.path.rglob("*") if p.is_file())
        return {
            "bundle": str(self.bundle.path), "kind": m.kind, "quantization": m.quantization,
            "opset": m.opset, "exporter": m.settings.get("exporter"), "graphs": [g.name for g in m.graphs],
            "trainable_tensors": len(m.trainables), "trainable_values": m.num_trainable,
            "bundle_bytes": sum(p.stat().st_size for p in files), "export_seconds": round(self.seconds, 3),
            "parity_max_abs_diff": dict(self.parity), "parity_shape": list(self.parity_shape),
            "quantized_max_abs_diff": dict(self.quantized_parity),
        }


def prepare_out(out: Path, overwrite: bool) -> Path:
    """Check ``out`` may be written and return a fresh ``<out>.partial`` folder to build in."""
    if out.exists() and (out.is_file() or any(out.iterdir())):
        is_bundle = (out / MANIFEST_FILE).is_file()
        if not is_bundle:
            raise ExportError(f"{out} is not empty and is not a bundle; choose a new folder for the bundle")
        if not overwrite:
            raise ExportError(f"{out} already holds a bundle (not empty); pass --overwrite or choose another folder")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


@contextlib.contextmanager
def bundle_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Build a bundle in a fresh ``<out>.partial`` folder (checked by :func:`prepare_out`) and move it
    to ``out`` when the block ends normally; on any error remove it, so nothing half-written is left."""
    work = prepare_out(out, overwrite)
    try:
        yield work
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def export_bundle(kind: ExportKind[C], config: C, out: str | Path, *, overwrite: bool = False) -> ExportResult:
    """Build ``config`` as a bundle of ``kind`` in ``out``, checked against the kind's reference.

    Written into ``<out>.partial`` and renamed at the end, so a failed export leaves no
    half-written bundle behind.
    """
    from fwdfleet.export.quantize import manifest_label, quantize_bundle_graph

    if not isinstance(config, kind.config_type):
        raise ExportError(f"export kind {kind.name!r} takes a {kind.config_type.__name__}, "
                          f"got {type(config).__name__}")
    start = time.perf_counter()
    out = Path(out)
    mode = kind.quantization(config)
    label = manifest_label(mode)  # validates the mode before the slow part
    with bundle_folder(out, overwrite) as work:
        built = kind.build(config, work)
        parity: dict[str, float] = {}
        quantized: dict[str, float] = {}
        samples: Sequence[Sample] = ()
        if kind.verify(config):
            samples = kind.samples(config, built)
            references = [kind.reference(config, built, s) for s in samples]
            parity = check_parity(kind, built, work, samples, references, strict=True)
        if mode is not None:
            staging = work / ".quantized"  # same file names, so an external data file keeps its reference
            for g in built.graphs:
                quantize_bundle_graph(work / g.file, staging / g.file, mode)
                for p in staging.iterdir():
                    p.replace(work / p.name)
            shutil.rmtree(staging, ignore_errors=True)
            if samples:
                quantized = check_parity(kind, built, work, samples, references, strict=False)
        extras = kind.manifest_extras(config, built)
        settings = dict(extras.settings)
        if quantized:
            settings["quantized_max_abs_diff"] = quantized
        manifest = BundleManifest(
            kind=kind.name, trainables=built.trainables, graphs=built.graphs, labels=extras.labels,
            tokenizer=extras.tokenizer, quantization=label, opset=built.opset, settings=settings,
        )
        write_bundle(work, manifest, built.initial)
    shape = _first_data_shape(built, samples)
    return ExportResult(load_bundle(out), time.perf_counter() - start, parity, shape, quantized)


def _first_data_shape(built: Built, samples: Sequence[Sample]) -> tuple[int, ...]:
    if not samples:
        return ()
    graph = next(g for g in built.graphs if g.name == samples[0].graph)
    return tuple(samples[0].feeds[graph.data_inputs[0].name].shape) if graph.data_inputs else ()


def check_parity(kind: ExportKind[Any], built: Built, work: Path, samples: Sequence[Sample],
                 references: Sequence[Sequence[np.ndarray]], *, strict: bool) -> dict[str, float]:
    """Run each sample through onnxruntime and compare with its reference output by output.

    Returns the largest absolute difference per output (``graph.output`` for graphs other
    than ``model``). ``strict``: raise ExportError beyond the kind's fp32 tolerance.
    """
    import onnxruntime as ort

    specs = {g.name: g for g in built.graphs}
    sessions: dict[str, Any] = {}
    diffs: dict[str, float] = {}
    for sample, ref in zip(samples, references, strict=True):
        spec = specs[sample.graph]
        if sample.graph not in sessions:
            sessions[sample.graph] = ort.InferenceSession(str(work / spec.file), providers=["CPUExecutionProvider"])
        names = [t.name for t in spec.outputs]
        got = sessions[sample.graph].run(names, dict(sample.feeds))
        for name, g, r in zip(names, got, ref, strict=True):
            key = name if sample.graph == "model" else f"{sample.graph}.{name}"
            r_np = np.asarray(r)
            if g.shape != r_np.shape:
                raise ExportError(f"exported graph {sample.graph!r} gives {name} of shape {g.shape}, the reference "
                                  f"{r_np.shape}; {kind.parity_hint}")
            diff = float(np.max(np.abs(g - r_np))) if g.size else 0.0
            diffs[key] = max(diffs.get(key, 0.0), diff)
            if strict and not np.allclose(g, r_np, rtol=kind.rtol, atol=kind.atol):
                shape = tuple(next(iter(sample.feeds.values())).shape)
                raise ExportError(f"exported graph {sample.graph!r} disagrees with the reference on {name} (max abs "
                                  f"diff {diff:.3g}) at shape {shape}; {kind.parity_hint}")
    return diffs


def perturbed(values: Mapping[str, np.ndarray], scale: float, seed: int) -> dict[str, np.ndarray]:
    """``values`` plus seeded Gaussian noise: non-zero trainables for a parity sample."""
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in values.items()}


def tensor_bytes(model: Any) -> int:
    import onnx

    total = 0
    for t in model.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def save_model(model: Any, out_file: Path) -> list[Path]:
    """One file under 2 GB; above, the graph plus exactly one ``<name>.data`` file beside it."""
    import onnx

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

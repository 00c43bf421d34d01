"""onnxruntime sessions over a verified bundle, with the trainable tensors fed as inputs.

A :class:`BundleSession` wraps one graph of a bundle. Every call passes the current trainable
values next to the data inputs, so a perturbed inference is the same call with different
trainable values: nothing in the graph changes between a plain and a perturbed forward.

Runtime-only settings (execution providers, threads, arena, pre-packing) live in
:class:`SessionOptions`, never in the bundle. Weights stored as ONNX external data are
memory-mapped by onnxruntime itself because the session is always created from the graph's
path (never from bytes read into Python).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from fwdfleet.bundle import Bundle, GraphSpec, TensorSpec
from fwdfleet.errors import BundleError, ConfigError, DataError

GraphOptimization = Literal["disable", "basic", "extended", "all"]
_OPT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_SHORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


@dataclass(frozen=True)
class PluginProvider:
    """An execution provider shipped as an onnxruntime plugin library in its own pip package.

    ``module`` is the package's import name (it has ``get_library_path()``); ``ep_name`` the
    provider name its library registers; ``device`` picks one of its devices by the
    ``ov_device`` metadata (OpenVINO) or takes the first (None); ``simulated_on`` names the
    machines on which the backend is a simulator (its latencies are not a phone's).
    """

    name: str
    ep_name: str
    module: str
    pip: str
    device: str | None = None
    simulated_on: tuple[str, ...] = ()
    needs_static_shapes: bool = False  # takes no node of a graph with symbolic dimensions

    def installed(self) -> bool:
        import importlib.util

        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def options(self) -> dict[str, str]:
        """Provider options for ``add_provider_for_devices``."""
        if self.module == "onnxruntime_qnn":
            import importlib

            return {"backend_path": str(importlib.import_module(self.module).get_qnn_htp_path())}
        return {}

    @property
    def simulated(self) -> bool:
        import platform

        return platform.machine().lower() in self.simulated_on


_QNN = ("QNNExecutionProvider", "onnxruntime_qnn", "onnxruntime-qnn")
_OV = ("OpenVINOExecutionProvider", "onnxruntime_ep_openvino", "onnxruntime-ep-openvino")
PLUGIN_PROVIDERS: dict[str, PluginProvider] = {
    p.name: p
    for p in (
        # Qualcomm's Hexagon NPU; the x86-64 Linux wheel runs it in a simulator
        PluginProvider("qnn-htp", *_QNN, simulated_on=("x86_64", "amd64"), needs_static_shapes=True),
        PluginProvider("openvino", *_OV),  # OpenVINO's first device (its CPU on a machine without Intel GPU/NPU)
        PluginProvider("openvino-cpu", *_OV, device="CPU"),
        PluginProvider("openvino-gpu", *_OV, device="GPU"),
        PluginProvider("openvino-npu", *_OV, device="NPU"),
    )
}
# onnxruntime-qnn 2.x is a plugin (it no longer replaces onnxruntime): `qnn` and the provider's own
# name mean its HTP backend
_PLUGIN_ALIASES = {"qnn": "qnn-htp", "qnnexecutionprovider": "qnn-htp", "openvinoexecutionprovider": "openvino"}
NPU_EXTRA_HINT = "pip install 'fwdfleet[npu]'"


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers, in its order of preference."""
    return list(ort.get_available_providers())


def provider_name(name: str) -> str:
    """Accept ``cpu``/``nnapi``/... as short forms of ``CPUExecutionProvider``/...; plugin
    providers (``qnn-htp``, ``openvino``, ...) keep their short name."""
    lower = _PLUGIN_ALIASES.get(name.lower(), name.lower())
    if lower in PLUGIN_PROVIDERS:
        return lower
    return _SHORT_PROVIDERS.get(lower, name)


_REGISTERED: dict[str, str] = {}  # ep_name -> library path, registered in this process


def plugin_devices(plugin: PluginProvider) -> list[Any]:
    """Register ``plugin``'s library (once per process) and return its onnxruntime EP devices.

    Raises :class:`ConfigError` saying what to install when the package is missing, and what
    onnxruntime said when the library does not load or offers no such device.
    """
    if not plugin.installed():
        raise ConfigError(f"execution provider {plugin.name!r} is not installed: pip install {plugin.pip} "
                          f"(or {NPU_EXTRA_HINT})")
    import importlib

    if plugin.ep_name not in _REGISTERED and not any(d.ep_name == plugin.ep_name for d in ort.get_ep_devices()):
        try:
            path = str(importlib.import_module(plugin.module).get_library_path())
            ort.register_execution_provider_library(plugin.ep_name, path)
        except Exception as e:  # ImportError, FileNotFoundError, onnxruntime's own failures
            raise ConfigError(f"execution provider {plugin.name!r} ({plugin.pip}) failed to load into onnxruntime "
                              f"{ort.__version__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}; "
                              f"reinstall it with pip install --upgrade {plugin.pip}") from e
        _REGISTERED[plugin.ep_name] = path
    devices = [d for d in ort.get_ep_devices() if d.ep_name == plugin.ep_name]
    if plugin.device is not None:
        devices = [d for d in devices if dict(d.ep_metadata).get("ov_device", "").upper() == plugin.device]
    if not devices:
        have = sorted({f"{d.ep_name}:{dict(d.ep_metadata).get('ov_device', d.device.type.name)}"
                       for d in ort.get_ep_devices()})
        raise ConfigError(f"execution provider {plugin.name!r} is installed but offers no "
                          f"{plugin.device or 'device'} on this machine; devices: {have}")
    return devices[:1]


@dataclass(frozen=True)
class SessionOptions:
    """How to run a bundle's graph on this device (never saved in the bundle).

    ``intra_op_threads``/``inter_op_threads`` of 0 let onnxruntime choose.

    Memory (peak RSS of a MiniLM LoRA training step, batch 16 x 128, measured by
    ``fwdfleet device memory``; see ``benchmarks/device_step.py``):

    * ``enable_mem_pattern`` (default **off**): onnxruntime's memory pattern pre-plans one
      block for all the activations of a run; with dynamic shapes it reserved ~90 MB more than
      allocating per operator (341 -> ~250 MB) for no measurable speed gain (0.98-1.05x), so it is
      off by default;
    * ``enable_cpu_mem_arena``: the arena keeps freed blocks for reuse; off lowers the resident
      size between runs but not the peak (within noise), and costs a few percent; on by default;
    * ``disable_prepacking``: onnxruntime keeps pre-packed copies of constant MatMul weights; with
      weights in external data (memory-mapped) it lowers the session's resident size after
      loading (107 -> 67 MB) but not the peak of a run, so it is off by default;
    * ``graph_optimization``: no measurable effect on peak memory;
    * ``allow_spinning`` (default **off**, onnxruntime's default is on): spinning intra-op threads
      keep the cores busy after a run and slow the perturbation arithmetic between forwards; on
      the FF MLP (643 K values, 2 cores) a training step took 0.72-0.98x the time with spinning
      off (three interleaved pairs) and the perturbation share fell from 20-38% to 13-22%.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    enable_cpu_mem_arena: bool = True
    enable_mem_pattern: bool = False
    disable_prepacking: bool = False
    graph_optimization: GraphOptimization = "all"
    allow_spinning: bool = False
    log_severity: int = 3
    record_assignment: bool = False  # keep which provider runs each node (see BundleSession.node_assignment)

    def __post_init__(self) -> None:
        if not self.providers:
            raise ValueError("SessionOptions.providers must name at least one execution provider")
        object.__setattr__(self, "providers", tuple(provider_name(p) for p in self.providers))
        plugins = [p for p in self.providers if p in PLUGIN_PROVIDERS]
        others = [p for p in self.providers if p not in PLUGIN_PROVIDERS and p != "CPUExecutionProvider"]
        if len(plugins) > 1 or (plugins and others):
            raise ValueError(f"SessionOptions.providers {list(self.providers)}: a plugin provider "
                             f"({', '.join(plugins)}) combines only with cpu (its fallback for unsupported nodes)")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("SessionOptions.intra_op_threads and inter_op_threads must be >= 0 (0: automatic)")
        if self.graph_optimization not in _OPT_LEVELS:
            raise ValueError(
                f"SessionOptions.graph_optimization {self.graph_optimization!r} is not one of {sorted(_OPT_LEVELS)}"
            )
        if not 0 <= self.log_severity <= 4:
            raise ValueError("SessionOptions.log_severity must be 0 (verbose) .. 4 (fatal)")

    def to_ort(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.enable_cpu_mem_arena = self.enable_cpu_mem_arena
        so.enable_mem_pattern = self.enable_mem_pattern
        so.graph_optimization_level = _OPT_LEVELS[self.graph_optimization]
        so.log_severity_level = self.log_severity
        if self.disable_prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        if self.record_assignment:
            so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        plugin = self.plugin
        if plugin is not None:
            so.add_provider_for_devices(plugin_devices(plugin), plugin.options())
        return so

    @property
    def plugin(self) -> PluginProvider | None:
        """The plugin provider among :attr:`providers`, if any."""
        return next((PLUGIN_PROVIDERS[p] for p in self.providers if p in PLUGIN_PROVIDERS), None)

    def ort_providers(self) -> list[str] | None:
        """The ``providers`` argument of ``InferenceSession`` (None: the plugin's devices, set in :meth:`to_ort`)."""
        return None if self.plugin is not None else list(self.providers)


def release_freed_memory() -> bool:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim``; False elsewhere).

    Called once a session is built: loading a graph whose weights are inside the ``.onnx`` file
    frees a graph-sized protobuf buffer and many weight-sized temporaries, after which glibc's
    adaptive mmap threshold made the peak of the next runs bimodal (MiniLM LoRA: 252 or 276 MB
    from one run to the next). After a trim it is 252-253 MB every time.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


def check_providers(providers: Sequence[str]) -> None:
    """Raise :class:`ConfigError` naming the available providers if one asked for is missing
    (for a plugin provider: what to install, or why its library did not load)."""
    have = available_providers()
    for p in providers:
        if p in PLUGIN_PROVIDERS:
            plugin_devices(PLUGIN_PROVIDERS[p])
    missing = [p for p in providers if p not in have and p not in PLUGIN_PROVIDERS]
    if missing:
        raise ConfigError(
            f"execution provider(s) {missing} not available in this onnxruntime {ort.__version__}; "
            f"available: {have} (install an onnxruntime build with that provider, or choose one of these)"
        )


def _check_static(graph: GraphSpec, options: SessionOptions) -> None:
    """A provider that needs fixed shapes, given a graph without them, runs nothing: say so, unless
    the user named ``cpu`` after it (then every node runs on the CPU, as asked)."""
    plugin = options.plugin
    if plugin is None or not plugin.needs_static_shapes or "CPUExecutionProvider" in options.providers:
        return
    dynamic = [t.name for t in graph.inputs if not all(isinstance(d, int) for d in t.shape)]
    if dynamic:
        raise ConfigError(f"{plugin.name} runs only graphs of fixed shapes, and graph {graph.name!r} takes {dynamic} "
                          "with symbolic dimensions: make a static bundle with `fwdfleet bundle quantize-static`, "
                          f"or give --providers {plugin.name},cpu to run it on the CPU")


_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


def _check_tensor(spec: TensorSpec, value: Any, what: str, error: type[Exception]) -> None:
    if not isinstance(value, np.ndarray):
        raise error(f"{what} {spec.name!r} must be a numpy array, got {type(value).__name__}")
    if value.dtype != np.dtype(_NP_DTYPES[spec.dtype]):
        raise error(f"{what} {spec.name!r} has dtype {value.dtype} but the graph expects {spec.dtype}")
    if value.ndim != len(spec.shape):
        raise error(
            f"{what} {spec.name!r} has shape {list(value.shape)} (rank {value.ndim}) but the graph expects "
            f"rank {len(spec.shape)} {list(spec.shape)}"
        )
    for axis, (got, want) in enumerate(zip(value.shape, spec.shape, strict=True)):
        if isinstance(want, int) and got != want:
            raise error(
                f"{what} {spec.name!r} has shape {list(value.shape)} but the graph expects {list(spec.shape)} "
                f"(axis {axis} must be {want})"
            )


def _stack_size(graph: str, specs: Sequence[TensorSpec], inputs: Sequence[TensorSpec]) -> int:
    """1 for a graph taking the trainables as the manifest shapes them, P for one taking (P, *shape)."""
    sizes = set()
    for spec, given in zip(specs, inputs, strict=True):
        if tuple(given.shape) == tuple(spec.shape):
            sizes.add(1)
        elif len(given.shape) == len(spec.shape) + 1 and tuple(given.shape[1:]) == tuple(spec.shape) \
                and isinstance(given.shape[0], int) and given.shape[0] >= 1:
            sizes.add(given.shape[0])
        else:
            raise BundleError(f"graph {graph!r} takes trainable {spec.name!r} as {list(given.shape)}, which is "
                              f"neither its manifest shape {list(spec.shape)} nor a stack of it; re-export the bundle")
    if len(sizes) > 1:
        raise BundleError(f"graph {graph!r} stacks its trainables unevenly ({sorted(sizes)}); re-export the bundle")
    return sizes.pop() if sizes else 1


class BundleSession:
    """One graph of a verified bundle on onnxruntime; trainables are passed on every call."""

    def __init__(self, bundle: Bundle, options: SessionOptions | None = None, graph: str = "model") -> None:
        self.bundle = bundle
        self.options = options if options is not None else SessionOptions()
        self.graph: GraphSpec = bundle.manifest.graph(graph)
        check_providers(self.options.providers)
        _check_static(self.graph, self.options)
        path = bundle.graph_path(graph)
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=self.options.to_ort(), providers=self.options.ort_providers()
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BundleError(
                f"onnxruntime cannot load graph {graph!r} from {path}: {str(e).strip().splitlines()[0]}; "
                "re-export the bundle or check that this onnxruntime supports its opset"
            ) from e
        release_freed_memory()
        actual = {i.name for i in self._session.get_inputs()}
        declared = {t.name for t in self.graph.inputs}
        if actual != declared:
            raise BundleError(
                f"graph {graph!r} of {bundle.path} takes inputs {sorted(actual)} but its manifest declares "
                f"{sorted(declared)}; the bundle is mismatched, re-export it"
            )
        self.trainable_specs: tuple[TensorSpec, ...] = tuple(
            t for t in bundle.manifest.trainables if t.name in self.graph.trainables
        )
        graph_inputs = {t.name: t for t in self.graph.inputs}
        # What the graph itself takes for each trainable: the manifest's shape, or (P, *shape) when
        # the graph evaluates P points at once (a stacked graph, see export/stack.py).
        self.trainable_inputs: tuple[TensorSpec, ...] = tuple(graph_inputs[t.name] for t in self.trainable_specs)
        self.stack: int = _stack_size(self.graph.name, self.trainable_specs, self.trainable_inputs)
        self.data_specs: tuple[TensorSpec, ...] = self.graph.data_inputs
        self.output_names: tuple[str, ...] = tuple(o.name for o in self._session.get_outputs())

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses."""
        return list(self._session.get_providers())

    def node_assignment(self) -> list[tuple[str, str, str]]:
        """``(provider, op_type, node name)`` for every node of the session's optimized graph.

        Needs ``SessionOptions(record_assignment=True)`` and an onnxruntime with
        ``get_provider_graph_assignment_info`` (1.23 or later); raises :class:`ConfigError` otherwise.
        """
        if not self.options.record_assignment:
            raise ConfigError("node assignment was not recorded: build the session with "
                              "SessionOptions(record_assignment=True)")
        info = getattr(self._session, "get_provider_graph_assignment_info", None)
        if info is None:
            raise ConfigError(f"onnxruntime {ort.__version__} cannot report node assignment; "
                              "pip install 'onnxruntime>=1.23'")
        return [(sub.ep_name, n.op_type, n.name) for sub in info() for n in sub.get_nodes()]

    def check_batch(self, batch: Mapping[str, Any]) -> None:
        """Raise :class:`DataError` unless ``batch`` holds exactly the graph's data inputs, well typed."""
        names = {t.name for t in self.data_specs}
        missing, extra = sorted(names - set(batch)), sorted(set(batch) - names)
        if missing or extra:
            raise DataError(
                f"batch for graph {self.graph.name!r} is missing {missing} and has unexpected {extra}; "
                f"the graph's data inputs are {[f'{t.name}: {t.dtype}{list(t.shape)}' for t in self.data_specs]}"
            )
        sizes = set()
        for spec in self.data_specs:
            _check_tensor(spec, batch[spec.name], "data input", DataError)
            if spec.shape and spec.shape[0] == "batch":
                sizes.add(batch[spec.name].shape[0])
        if len(sizes) > 1:
            raise DataError(f"data inputs disagree on the batch size: {sorted(sizes)}")

    def check_trainables(self, trainables: Mapping[str, Any], *, stacked: bool = False) -> None:
        """Raise :class:`BundleError` unless ``trainables`` match the bundle's trainable specs
        (``stacked``: the graph's own inputs, ``(P, *shape)`` for a stacked graph)."""
        names = {t.name for t in self.trainable_specs}
        missing = sorted(names - set(trainables))
        if missing:
            raise BundleError(f"trainable values are missing {missing} for graph {self.graph.name!r}")
        for spec in self.trainable_inputs if stacked else self.trainable_specs:
            _check_tensor(spec, trainables[spec.name], "trainable", BundleError)

    def run(
        self,
        trainables: Mapping[str, npt.NDArray[Any]],
        batch: Mapping[str, npt.NDArray[Any]],
        outputs: Sequence[str] = ("loss",),
        *,
        check: bool = True,
    ) -> dict[str, npt.NDArray[Any]]:
        """Run the graph; ``check=False`` skips validation (hot loops that validated once)."""
        if check:
            self.check_batch(batch)
            self.check_trainables(trainables, stacked=True)
            unknown = sorted(set(outputs) - set(self.output_names))
            if unknown:
                raise BundleError(f"graph {self.graph.name!r} has no output(s) {unknown}; it has {self.output_names}")
        feed: dict[str, Any] = dict(batch)
        for spec in self.trainable_specs:
            feed[spec.name] = trainables[spec.name]
        values = self._session.run(list(outputs), feed)
        return {name: np.asarray(v) for name, v in zip(outputs, values, strict=True)}

    def bind(
        self,
        trainables: Mapping[str, npt.NDArray[Any]],
        batch: Mapping[str, npt.NDArray[Any]],
        outputs: Sequence[str] = ("loss",),
    ) -> BoundRun:
        """Bind input buffers once (IOBinding) for repeated runs.

        The bound arrays are used in place, without a copy: writing new values into the same
        trainable arrays and calling :meth:`BoundRun.run` evaluates the graph at the new values.
        This is how the estimator runs its perturbed forwards (one binding, buffers updated in place).
        """
        self.check_batch(batch)
        self.check_trainables(trainables, stacked=True)
        arrays = dict(batch)
        for spec in self.trainable_specs:
            arrays[spec.name] = trainables[spec.name]
        for name, value in arrays.items():
            if not value.flags.c_contiguous:
                raise ValueError(f"input {name!r} must be C-contiguous to be bound in place")
        return BoundRun(self._session, arrays, tuple(outputs), rebind=self.providers[0] != "CPUExecutionProvider")

    def loss(
        self, trainables: Mapping[str, npt.NDArray[Any]], batch: Mapping[str, npt.NDArray[Any]], *, check: bool = True
    ) -> npt.NDArray[np.float32]:
        """Per-sample loss, shape (batch,)."""
        return np.asarray(self.run(trainables, batch, ("loss",), check=check)["loss"], dtype=np.float32)


class BoundRun:
    """Repeated runs of a session over input buffers bound once (see :meth:`BundleSession.bind`)."""

    def __init__(self, session: ort.InferenceSession, arrays: dict[str, npt.NDArray[Any]], outputs: tuple[str, ...],
                 *, rebind: bool = False):
        self._session = session
        self._arrays = arrays  # keeps the bound buffers alive
        self._binding = session.io_binding()
        # A provider other than the CPU may take its own copy of an input when it is bound (the
        # OpenVINO plugin does, and then never sees values written into the buffer): with
        # ``rebind`` the inputs are bound again before every run (no copy on our side).
        self._rebind = rebind
        self._bind_inputs()
        for name in outputs:
            self._binding.bind_output(name)
        self.outputs = outputs

    def _bind_inputs(self) -> None:
        for name, value in self._arrays.items():
            self._binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))

    def run(self) -> dict[str, npt.NDArray[Any]]:
        if self._rebind:
            self._bind_inputs()
        self._session.run_with_iobinding(self._binding)
        values = self._binding.copy_outputs_to_cpu()
        return {name: np.asarray(v) for name, v in zip(self.outputs, values, strict=True)}

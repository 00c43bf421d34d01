"""The bundle: the folder (optionally zipped) that alone is enough for a device.

A bundle holds

* one or more ONNX graphs (``model.onnx`` always; Forward-Forward bundles add one graph per
  layer) with the frozen weights as initializers and **every trainable tensor as a named graph
  input**, so that a perturbation is just a different input value;
* ``trainables.npz``: the current values of the trainable tensors (loaded with
  ``allow_pickle=False``; no pickle anywhere);
* ``manifest.json``: schema and toolkit versions, the kind, the trainable names/shapes/dtypes
  in their canonical order, each graph's inputs and outputs, label names, tokenizer files,
  kind-specific settings and a SHA-256 checksum of every other file.

Runtime-only settings (threads, execution providers, arenas) never go in a bundle.

The canonical trainable order in the manifest defines the flat layout that perturbations are
drawn over (see :mod:`fwdfleet.perturbation`): both the device and the aggregator
concatenate the tensors in this order, each flattened in C order.

This module needs numpy only: ``export`` writes bundles with it, ``device_runtime`` and
``aggregator`` read them with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet import __version__
from fwdfleet.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TRAINABLES_FILE = "trainables.npz"
KINDS = ("mlp", "seq_cls_lora", "causal_lm_lora", "ff_mlp", "ff_cnn")
# manifest.quantization: None (fp32), weight quantization (int8/int4, dynamic shapes), or static QDQ with
# 16- or 8-bit activations and 8-bit weights at fixed shapes (for NPUs; export/quantize.py)
QUANTIZATIONS = (None, "int8", "int4", "qdq-a16w8", "qdq-a8w8")
_DTYPES = ("float32", "float16", "int64", "int32", "bool")

Dim = int | str  # a fixed size, or a symbolic name for a dynamic axis ("batch", "sequence")


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a graph input/output or of a trainable tensor."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TensorSpec.name must not be empty")
        if self.dtype not in _DTYPES:
            raise ValueError(f"TensorSpec.dtype {self.dtype!r} is not one of {_DTYPES}")

    @property
    def size(self) -> int:
        """Number of elements; only defined for fully static shapes."""
        if not all(isinstance(d, int) for d in self.shape):
            raise ValueError(f"tensor {self.name!r} has a dynamic shape {self.shape}")
        return math.prod(int(d) for d in self.shape)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), shape=tuple(d["shape"]), dtype=str(d.get("dtype", "float32")))


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of a bundle and the tensors it takes and gives.

    ``trainables`` names the graph inputs that are trainable tensors (a subset of ``inputs``);
    the other inputs are data (``input_ids``, ``labels``, ``x``, ...).
    """

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    trainables: tuple[str, ...] = ()

    @property
    def data_inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.inputs if t.name not in self.trainables)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GraphSpec:
        return cls(
            name=str(d["name"]),
            file=str(d["file"]),
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            trainables=tuple(d.get("trainables", ())),
        )


@dataclass(frozen=True)
class TokenizerSpec:
    """Tokenizer files shipped in the bundle (relative paths) and how to call the tokenizer."""

    files: tuple[str, ...]
    max_length: int
    padding_side: str = "right"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TokenizerSpec:
        return cls(
            files=tuple(d["files"]),
            max_length=int(d["max_length"]),
            padding_side=str(d.get("padding_side", "right")),
        )


@dataclass(frozen=True)
class BundleManifest:
    """What ``manifest.json`` says. Written sorted, with the toolkit version, like PEFT configs."""

    kind: str
    trainables: tuple[TensorSpec, ...]
    graphs: tuple[GraphSpec, ...]
    labels: tuple[str, ...] = ()
    tokenizer: TokenizerSpec | None = None
    quantization: str | None = None
    opset: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)  # relative path -> sha256
    trainables_file: str = TRAINABLES_FILE
    schema_version: int = SCHEMA_VERSION
    toolkit_version: str = __version__

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"BundleManifest.kind {self.kind!r} is not one of {KINDS}")
        if not self.graphs:
            raise ValueError("BundleManifest.graphs must name at least one graph")
        names = [t.name for t in self.trainables]
        if len(set(names)) != len(names):
            raise ValueError("BundleManifest.trainables has duplicate names")
        for g in self.graphs:
            unknown = set(g.trainables) - set(names)
            if unknown:
                raise ValueError(f"graph {g.name!r} names unknown trainables {sorted(unknown)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"BundleManifest.quantization {self.quantization!r} is not one of {QUANTIZATIONS}")

    @property
    def num_trainable(self) -> int:
        """Total number of trainable scalars: the dimension perturbations are drawn in."""
        return sum(t.size for t in self.trainables)

    def graph(self, name: str = "model") -> GraphSpec:
        for g in self.graphs:
            if g.name == name:
                return g
        raise BundleError(
            f"bundle of kind {self.kind!r} has no graph {name!r}; it has {[g.name for g in self.graphs]}"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest.json") -> BundleManifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"{source} is not valid JSON ({e}); re-export the bundle") from e
        if not isinstance(d, dict):
            raise BundleError(f"{source} must hold a JSON object; re-export the bundle")
        version = d.get("schema_version")
        if not isinstance(version, int):
            raise BundleError(f"{source} has no integer schema_version; is this a fwdfleet bundle?")
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"{source} has schema version {version} but this fwdfleet ({__version__}) reads up to "
                f"{SCHEMA_VERSION}; upgrade fwdfleet on this device"
            )
        try:
            tok = d.get("tokenizer")
            return cls(
                kind=str(d["kind"]),
                trainables=tuple(TensorSpec.from_json(t) for t in d["trainables"]),
                graphs=tuple(GraphSpec.from_json(g) for g in d["graphs"]),
                labels=tuple(d.get("labels", ())),
                tokenizer=TokenizerSpec.from_json(tok) if tok else None,
                quantization=d.get("quantization"),
                opset=d.get("opset"),
                settings=dict(d.get("settings", {})),
                files=dict(d.get("files", {})),
                trainables_file=str(d.get("trainables_file", TRAINABLES_FILE)),
                schema_version=version,
                toolkit_version=str(d.get("toolkit_version", "unknown")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{source} is malformed ({type(e).__name__}: {e}); re-export the bundle") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_trainables(manifest: BundleManifest, values: Mapping[str, np.ndarray]) -> None:
    expected = {t.name for t in manifest.trainables}
    if set(values) != expected:
        missing, extra = sorted(expected - set(values)), sorted(set(values) - expected)
        raise BundleError(f"trainable values do not match the manifest: missing {missing}, unexpected {extra}")
    for t in manifest.trainables:
        v = values[t.name]
        if tuple(v.shape) != tuple(t.shape) or str(v.dtype) != t.dtype:
            raise BundleError(
                f"trainable {t.name!r} is {v.dtype}{list(v.shape)} but the manifest says {t.dtype}{list(t.shape)}"
            )


def write_bundle(directory: str | Path, manifest: BundleManifest, trainables: Mapping[str, np.ndarray]) -> Path:
    """Write ``trainables.npz`` and ``manifest.json`` into ``directory``.

    The graphs and tokenizer files named by the manifest must already be in ``directory``. The
    checksums of every file of the bundle (all but the manifest) are computed here and recorded.
    """
    directory = Path(directory)
    _check_trainables(manifest, trainables)
    with open(directory / manifest.trainables_file, "wb") as f:
        arrays = {t.name: np.ascontiguousarray(trainables[t.name]) for t in manifest.trainables}
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as savez's own flags
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            files[p.relative_to(directory).as_posix()] = sha256_file(p)
    for g in manifest.graphs:
        if g.file not in files:
            raise BundleError(f"graph file {g.file!r} is not in {directory}")
    manifest = replace(manifest, files=files, toolkit_version=__version__)
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(directory / MANIFEST_FILE)
    return directory


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: BundleManifest

    def graph_path(self, name: str = "model") -> Path:
        return self.path / self.manifest.graph(name).file

    def load_trainables(self) -> dict[str, np.ndarray]:
        """The trainable tensors, in the manifest's canonical order."""
        p = self.path / self.manifest.trainables_file
        try:
            with np.load(p, allow_pickle=False) as z:
                values = {t.name: np.array(z[t.name]) for t in self.manifest.trainables}
        except (OSError, KeyError, ValueError) as e:
            raise BundleError(f"cannot read trainable values from {p}: {e}; re-export the bundle") from e
        _check_trainables(self.manifest, values)
        return values

    def save_as(self, out: str | Path, trainables: Mapping[str, np.ndarray]) -> Bundle:
        """Copy this bundle to ``out`` with new trainable values (the graphs are unchanged)."""
        out = Path(out)
        if out.resolve() == self.path.resolve():
            raise BundleError(f"refusing to overwrite the bundle in place: {out}; choose another folder")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(self.path, out)
        (out / self.manifest.trainables_file).unlink()
        (out / MANIFEST_FILE).unlink()
        write_bundle(out, self.manifest, trainables)
        return load_bundle(out)


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Open a bundle folder or ``.zip``, check its schema version and (by default) its checksums.

    A zip is unpacked into a temporary folder that lives as long as the process.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle not found: {path}; pass the folder or .zip written by `fwdfleet export`")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise BundleError(f"{path} is neither a bundle folder nor a zip file")
        target = Path(tempfile.mkdtemp(prefix="fwdfleet-bundle-"))
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise BundleError(f"{path} holds an unsafe member path {member!r}")
            zf.extractall(target)
        entries = [p for p in target.iterdir()]
        path = entries[0] if len(entries) == 1 and entries[0].is_dir() else target
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        raise BundleError(f"{path} has no {MANIFEST_FILE}; is it a bundle written by `fwdfleet export`?")
    manifest = BundleManifest.from_json(mf.read_text(), source=str(mf))
    needed = {g.file for g in manifest.graphs} | {manifest.trainables_file}
    if manifest.tokenizer:
        needed |= set(manifest.tokenizer.files)
    missing = sorted(f for f in needed if not (path / f).is_file())
    if missing:
        raise BundleError(f"bundle {path} is missing {missing}; copy the whole bundle folder")
    if verify:
        verify_checksums(path, manifest)
    return Bundle(path=path, manifest=manifest)


def verify_checksums(path: Path, manifest: BundleManifest) -> None:
    for rel, digest in sorted(manifest.files.items()):
        p = path / rel
        if not p.is_file():
            raise BundleError(f"bundle {path} is missing {rel}; copy the whole bundle folder")
        actual = sha256_file(p)
        if actual != digest:
            raise BundleError(
                f"checksum mismatch for {rel} in {path} (expected {digest[:12]}..., got {actual[:12]}...): "
                "the bundle is corrupt or was modified; copy or export it again"
            )


def zip_bundle(bundle: Bundle, out: str | Path) -> Path:
    """Write the bundle folder as a zip (stored, not compressed: ONNX weights barely compress).

    Entries are sorted and carry a fixed date, so the same bundle gives the same bytes on every
    host (a device that already holds it can skip the download by checksum).
    """
    out = Path(out)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for p in sorted(bundle.path.rglob("*")):
            if p.is_file():
                info = zipfile.ZipInfo(p.relative_to(bundle.path).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with open(p, "rb") as src, zf.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    return out

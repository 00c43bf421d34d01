"""A device's local data: numpy-only loaders and datasets that yield a graph's data inputs.

Formats:

* **IDX** (``.gz`` or raw; the MNIST / Fashion-MNIST layout): an images file and a labels file,
  or a folder holding ``{split}-images-idx3-ubyte[.gz]`` and ``{split}-labels-idx1-ubyte[.gz]``
  (``t10k`` for the MNIST test split). Pixels are scaled to [0, 1] and flattened.
* **CSV**: text with a header ``label,title,description`` (AG News; labels 1..4 become 0..3) or
  ``label,text``; or numbers with a ``label`` column (any position) and numeric feature columns.
* **.npz** (loaded without pickle): ``x`` (or ``features``) and ``labels`` (or ``y``), or arrays
  named exactly as the graph's data inputs.

A :class:`LocalDataset` returns, for ``batch(seed, size)``, a dict holding exactly the graph's
data inputs (``x`` + ``labels``; or ``input_ids`` + ``attention_mask`` [+ ``labels``] for text
bundles, tokenized with the bundle's ``tokenizer.json`` through the optional ``tokenizers``
package). A missing or malformed file raises :class:`fwdfleet.errors.DataError`.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fwdfleet.bundle import Bundle, GraphSpec
from fwdfleet.errors import DataError

Batch = dict[str, npt.NDArray[Any]]
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_TEXT_INPUTS = ("input_ids", "attention_mask")


class LocalDataset(Protocol):
    def __len__(self) -> int: ...

    def batch(self, seed: int, size: int) -> Batch:
        """``size`` examples drawn without replacement (with, if the dataset is smaller) by ``seed``."""
        ...


def _sample(n: int, seed: int, size: int) -> npt.NDArray[np.int64]:
    if n == 0:
        raise DataError("the dataset is empty; give a file with at least one example")
    if size < 1:
        raise DataError(f"batch size must be >= 1, got {size}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=size > n)).astype(np.int64)


class _Examples:
    """What both datasets share, in terms of their ``__len__`` and ``take``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, indices: npt.NDArray[np.int64]) -> Batch:
        raise NotImplementedError

    def batch(self, seed: int, size: int) -> Batch:
        return self.take(_sample(len(self), seed, size))

    def batches(self, size: int, limit: int | None = None) -> Iterator[Batch]:
        """Consecutive batches in order (for evaluation), at most ``limit`` examples."""
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(0, n, size):
            yield self.take(np.arange(i, min(i + size, n), dtype=np.int64))

    def _split_order(self, eval_fraction: float, seed: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Shuffle with ``seed``; (kept indices, held-out ``eval_fraction`` of the indices)."""
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        order = np.random.default_rng(seed).permutation(len(self)).astype(np.int64)
        cut = len(self) - max(1, round(eval_fraction * len(self)))
        return order[:cut], order[cut:]


@dataclass(frozen=True)
class ArrayDataset(_Examples):
    """Examples held as arrays keyed by graph input name (first axis = example)."""

    arrays: dict[str, npt.NDArray[Any]]

    def __post_init__(self) -> None:
        sizes = {len(v) for v in self.arrays.values()}
        if len(sizes) != 1:
            raise DataError(
                f"dataset arrays disagree on the number of examples: { {k: len(v) for k, v in self.arrays.items()} }"
            )

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, indices: npt.NDArray[np.int64]) -> Batch:
        return {k: np.ascontiguousarray(v[indices]) for k, v in self.arrays.items()}

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
        """Shuffle with ``seed`` and split off ``eval_fraction`` of the examples for evaluation."""
        keep, held = self._split_order(eval_fraction, seed)
        return ArrayDataset(self.take(keep)), ArrayDataset(self.take(held))


# --------------------------------------------------------------------------------------- readers


def _open(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def load_idx(path: str | Path) -> npt.NDArray[Any]:
    """Read one IDX file (MNIST layout: magic 0 0 <dtype> <ndim>, big-endian uint32 sizes, data)."""
    path = Path(path)
    raw = _open(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file (expected magic bytes 00 00 <dtype> <ndim>, as in MNIST)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its IDX header needs {header} bytes")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its IDX header {list(shape)} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, split: str, what: str) -> Path:
    names = (f"{split}-{what}-idx{1 if what == 'labels' else 3}-ubyte", f"{split}-{what}.idx")
    for name in names:
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    raise DataError(f"{folder} has no IDX {what} file for split {split!r} (expected {names[0]}[.gz])")


def load_idx_pair(images: str | Path, labels: str | Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Images flattened to float32 in [0, 1] (uint8 input) and int64 labels."""
    x = load_idx(images)
    y = load_idx(labels)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{labels} must hold one label per image of {images} ({len(x)}), it holds shape {y.shape}")
    xf = x.reshape(len(x), -1).astype(np.float32)
    if x.dtype == np.uint8:
        xf /= 255.0
    return xf, y.astype(np.int64)


CIFAR10_RECORD = 1 + 3 * 32 * 32  # label byte, then 1024 red, 1024 green, 1024 blue bytes (row-major 32x32)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar10_batch(path: str | Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """One CIFAR-10 binary batch (``data_batch_N.bin`` / ``test_batch.bin``, 3,073-byte records):
    images (n, 3, 32, 32) float32 in [0, 1] and labels int64 in [0, 10)."""
    path = Path(path)
    raw = _open(path)
    if not raw or len(raw) % CIFAR10_RECORD:
        raise DataError(f"{path} holds {len(raw)} bytes, not a whole number of CIFAR-10 records of "
                        f"{CIFAR10_RECORD} bytes (1 label + 3x32x32 pixels); is it a binary-version batch file?")
    rec = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() >= len(CIFAR10_CLASSES):
        bad = int(np.argmax(labels >= len(CIFAR10_CLASSES)))
        raise DataError(f"{path}: record {bad} has label {labels[bad]}, but CIFAR-10 labels are 0..9 "
                        "(a CIFAR-100 file has 2 label bytes per record)")
    images = rec[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return images, labels


def load_cifar10(folder: str | Path, split: str = "train") -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The CIFAR-10 binary batches in ``folder`` (``cifar-10-batches-bin``): ``train`` reads
    ``data_batch_1.bin`` .. ``data_batch_5.bin`` (those present, at least one), ``test`` ``test_batch.bin``."""
    folder = Path(folder)
    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    files = [folder / "test_batch.bin"] if split == "test" else \
        [p for p in (folder / f"data_batch_{i}.bin" for i in range(1, 6)) if p.is_file()]
    if not files or not files[0].is_file():
        want = "test_batch.bin" if split == "test" else "data_batch_1.bin .. data_batch_5.bin"
        raise DataError(f"{folder} has no CIFAR-10 {split} batch ({want}); download the binary version "
                        "(cifar-10-binary.tar.gz) and point at its cifar-10-batches-bin folder")
    parts = [load_cifar10_batch(p) for p in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@dataclass(frozen=True)
class RawData:
    """What a file holds before it is fitted to a graph: features or texts, and labels."""

    labels: npt.NDArray[np.int64] | None
    features: npt.NDArray[np.float32] | None = None
    texts: tuple[str, ...] | None = None
    arrays: dict[str, npt.NDArray[Any]] | None = None  # npz arrays named like graph inputs
    source: str = ""
    one_based_labels: bool = False
    # text labels ("ham"/"spam"): the class names, sorted; ``labels`` then index into them
    label_names: tuple[str, ...] | None = None
    # instruction data: ``texts`` are the prompts and these the responses (the loss is on these)
    responses: tuple[str, ...] | None = None


def _label_column(
    values: Sequence[str], source: str, column: str
) -> tuple[npt.NDArray[np.int64], tuple[str, ...] | None]:
    """Integer labels as they are; text labels as indices into their sorted names."""
    stripped = [v.strip() for v in values]
    if any(not v for v in stripped):
        raise DataError(f"{source}: every row needs a {column!r} value (an integer or a class name)")
    try:
        return np.array([int(v) for v in stripped], dtype=np.int64), None
    except ValueError:
        names = tuple(sorted(set(stripped)))
        index = {n: i for i, n in enumerate(names)}
        return np.array([index[v] for v in stripped], dtype=np.int64), names


def fit_labels(raw: RawData, classes: Sequence[str]) -> npt.NDArray[np.int64] | None:
    """``raw``'s labels as indices into ``classes`` (a bundle's labels): text labels are looked up
    by name; a name the bundle lacks is an error naming it. Integer labels pass unchanged."""
    if raw.label_names is None or raw.labels is None:
        return raw.labels
    if not classes or all(c.isdigit() for c in classes):  # the bundle's classes are bare numbers
        return raw.labels
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(raw.label_names) - set(index))
    if missing:
        raise DataError(f"{raw.source} has labels {missing} that the bundle's label map {list(classes)} lacks; "
                        "re-export the bundle with these labels, or fix the data")
    lookup = np.array([index[n] for n in raw.label_names], dtype=np.int64)
    return lookup[raw.labels]


def read_csv(path: str | Path, label_column: str = "label") -> RawData:
    path = Path(path)
    text = _open(path).decode("utf-8", errors="replace")
    rows = list(csv.reader(text.splitlines()))
    if len(rows) < 2:
        raise DataError(f"{path} needs a header row and at least one example row")
    header = [h.strip().lower() for h in rows[0]]
    if "prompt" in header and "response" in header:  # instruction data: no labels
        pi, ri = header.index("prompt"), header.index("response")
        body = [r for r in rows[1:] if r]
        short = next((n for n, r in enumerate(body, start=2) if len(r) <= max(pi, ri)), None)
        if short is not None:
            raise DataError(f"{path}: row {short} lacks its prompt or response")
        return RawData(labels=None, texts=tuple(r[pi] for r in body), responses=tuple(r[ri] for r in body),
                       source=str(path))
    if label_column not in header:
        raise DataError(
            f"{path} has no {label_column!r} column in its header {rows[0]}; expected e.g. "
            "label,title,description (AG News), label,f1,f2,... (numbers) or prompt,response (instructions)"
        )
    li = header.index(label_column)
    body = [r for r in rows[1:] if r]
    short = next((n for n, r in enumerate(body, start=2) if len(r) <= li), None)
    if short is not None:
        raise DataError(f"{path}: row {short} has no {label_column!r} value")
    labels, names = _label_column([r[li] for r in body], str(path), label_column)
    text_cols = [i for i, h in enumerate(header) if h in ("title", "description", "text")]
    if text_cols:
        texts = tuple(" ".join(r[i].strip() for i in text_cols if i < len(r)).replace("\\", " ") for r in body)
        return RawData(labels=labels, texts=texts, source=str(path), label_names=names,
                       one_based_labels=names is None and bool(labels.min() >= 1))
    feature_cols = [i for i in range(len(header)) if i != li]
    try:
        x = np.array([[float(r[i]) for i in feature_cols] for r in body], dtype=np.float32)
    except (ValueError, IndexError) as e:
        raise DataError(
            f"{path}: a numeric CSV needs numbers in every column besides {label_column!r} "
            f"(or a title/description/text column for text) ({e})"
        ) from e
    return RawData(labels=labels, features=x, source=str(path), label_names=names)


def read_tsv(path: str | Path) -> RawData:
    """``label<TAB>text`` lines (the SMS-spam layout); an optional first line ``label<TAB>text``."""
    path = Path(path)
    lines = [ln for ln in _open(path).decode("utf-8", errors="replace").splitlines() if ln.strip()]
    if lines and lines[0].lower().split("\t")[:2] == ["label", "text"]:
        lines = lines[1:]
    bad = next((n for n, ln in enumerate(lines, start=1) if "\t" not in ln), None)
    if not lines or bad is not None:
        raise DataError(f"{path}: expected one example per line as label<TAB>text"
                        + (f"; line {bad} has no tab" if bad is not None else "; the file is empty"))
    pairs = [ln.split("\t", 1) for ln in lines]
    labels, names = _label_column([p[0] for p in pairs], str(path), "label")
    return RawData(labels=labels, texts=tuple(p[1].strip() for p in pairs), source=str(path), label_names=names)


def read_npz(path: str | Path) -> RawData:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.array(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npz without pickled objects ({e})") from e
    x = arrays.get("x", arrays.get("features"))
    y = arrays.get("labels", arrays.get("y"))
    if x is not None:
        return RawData(
            labels=None if y is None else y.astype(np.int64),
            features=x.reshape(len(x), -1).astype(np.float32),
            source=str(path),
        )
    return RawData(labels=None if y is None else y.astype(np.int64), arrays=arrays, source=str(path))


def read_data(path: str | Path, *, split: str = "train", label_column: str = "label") -> RawData:
    """Read a data file or folder (IDX folder, IDX images file, .csv, .tsv/.txt, .npz) into :class:`RawData`."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path not found: {p}; give an IDX folder or file, a .csv, a .tsv or a .npz")
    if p.is_dir():
        for name in ("data.npz", "data.csv", f"{split}.npz", f"{split}.csv"):
            if (p / name).is_file():
                return read_data(p / name, split=split, label_column=label_column)
        x, y = load_idx_pair(_find_idx(p, split, "images"), _find_idx(p, split, "labels"))
        return RawData(labels=y, features=x, source=str(p))
    name = p.name.lower()
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        return read_csv(p, label_column)
    if name.endswith(".npz"):
        return read_npz(p)
    if name.endswith((".tsv", ".tsv.gz", ".txt")):
        return read_tsv(p)
    if "images" in name:
        labels = p.with_name(p.name.replace("images", "labels").replace("idx3", "idx1"))
        x, y = load_idx_pair(p, labels)
        return RawData(labels=y, features=x, source=str(p))
    raise DataError(f"{p}: unknown data format; expected an IDX folder or images file, a .csv (a label column "
                    "and title/description/text or numeric columns), a .tsv/.txt of label<TAB>text lines, or a .npz")


# ------------------------------------------------------------------------------- fitting to a graph


def num_classes(bundle: Bundle, graph: str = "model") -> int | None:
    """The number of classes a bundle's graph predicts (labels in the manifest, or the logits width)."""
    if bundle.manifest.labels:
        return len(bundle.manifest.labels)
    for out in bundle.manifest.graph(graph).outputs:
        if out.name == "logits" and len(out.shape) == 2 and isinstance(out.shape[1], int):
            return out.shape[1]
    return None


def load_tokenizer(bundle: Bundle) -> Any:
    """The bundle's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` (the text extra), or a DataError saying why not."""
    spec = bundle.manifest.tokenizer
    if spec is None:
        raise DataError(f"bundle {bundle.path} takes token ids but ships no tokenizer; re-export it with one")
    files = [f for f in spec.files if f.endswith("tokenizer.json")]
    if not files:
        raise DataError(f"bundle {bundle.path} has no tokenizer.json among {list(spec.files)}; re-export it")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise DataError(
            "text data needs the `tokenizers` package: pip install 'fwdfleet[text]' (or pip install tokenizers)"
        ) from e
    return Tokenizer.from_file(str(bundle.path / files[0]))


TEXT_SLOT = "{text}"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt around each text (prompted classification): ``template`` holds one ``{text}`` slot
    and ends where the answer (a label word) follows.

    Texts are cut, never the template, so that the rendered prompt fits ``max_length`` tokens and
    its answer cue stays at the end; the prompt is tokenized as one string, as the model reads it.
    """

    template: str

    def __post_init__(self) -> None:
        if self.template.count(TEXT_SLOT) != 1:
            raise DataError(f"a prompt template needs exactly one {TEXT_SLOT} slot, got {self.template!r}")

    def render(self, text: str) -> str:
        return self.template.replace(TEXT_SLOT, text)

    def encode(self, tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids of each rendered prompt, at most ``max_length`` long.

        ``tokenizer`` is a ``tokenizers.Tokenizer`` (or a transformers fast tokenizer, whose
        ``backend_tokenizer`` is used); its own padding and truncation settings are ignored."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(getattr(tokenizer, "backend_tokenizer", tokenizer).to_str())
        tok.no_padding()
        tok.no_truncation()
        empty = len(tok.encode(self.render("")).ids)
        if empty >= max_length:
            raise DataError(f"the prompt template alone takes {empty} tokens; the bundle's sequence length is "
                            f"{max_length}: export with a longer --max-length or shorten the template")
        out = []
        for text in texts:
            ids = tok.encode(self.render(text)).ids
            if len(ids) > max_length:  # cut the text at a token boundary, then re-tokenize the whole
                offsets = tok.encode(text, add_special_tokens=False).offsets
                keep = max(0, len(offsets) - (len(ids) - max_length))
                while True:
                    ids = tok.encode(self.render(text[: offsets[keep - 1][1]] if keep else "")).ids
                    if len(ids) <= max_length or keep == 0:
                        break
                    keep -= 1
            out.append(ids)
        return out


def pad_right(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> Batch:
    """``input_ids`` and ``attention_mask`` (len(rows), width) of token-id rows padded on the right."""
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


class TextDataset(_Examples):
    """Texts tokenized per batch with the bundle's tokenizer (padding to the longest in the batch)."""

    def __init__(
        self,
        texts: Sequence[str],
        labels: npt.NDArray[np.int64] | None,
        tokenizer: Any,
        max_length: int,
        *,
        pad_id: int = 0,
        padding_side: str = "right",
        pad_to_max_length: bool = False,
        prompt: PromptTemplate | None = None,
        responses: Sequence[str] | None = None,
    ) -> None:
        if labels is not None and len(labels) != len(texts):
            raise DataError(f"{len(texts)} texts but {len(labels)} labels")
        if responses is not None and len(responses) != len(texts):
            raise DataError(f"{len(texts)} prompts but {len(responses)} responses")
        if prompt is not None and padding_side != "right":
            raise DataError("prompted classification reads the answer after the last real token: pad on the right")
        self.texts = tuple(texts)
        self.labels = labels
        self.max_length = max_length
        self.prompt = prompt
        self.responses = None if responses is None else tuple(responses)
        self._pad = (pad_id, max_length if pad_to_max_length else 0)
        self._tok = tokenizer
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(
            direction=padding_side, pad_id=pad_id, length=max_length if pad_to_max_length else None
        )

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, indices: npt.NDArray[np.int64]) -> Batch:
        texts = [self.texts[int(i)] for i in indices]
        if self.prompt is not None:
            rows = self.prompt.encode(self._tok, texts, self.max_length)
            pad_id, fixed = self._pad
            out: Batch = pad_right(rows, max(fixed, max(len(r) for r in rows)), pad_id)
        elif self.responses is not None:  # prompt + response as one text; the loss mask marks the response
            responses = [self.responses[int(i)] for i in indices]
            encodings = self._tok.encode_batch([p + r for p, r in zip(texts, responses, strict=True)])
            out = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                "loss_mask": np.array([[int(m and start >= len(p)) for (start, _), m in zip(e.offsets, e.attention_mask,
                                                                                              strict=True)]
                                       for e, p in zip(encodings, texts, strict=True)], dtype=np.int64),
            }
        else:
            encodings = self._tok.encode_batch(texts)
            out = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            }
        if self.labels is not None:
            out["labels"] = np.ascontiguousarray(self.labels[indices])
        return out

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[TextDataset, TextDataset]:
        keep, held = self._split_order(eval_fraction, seed)

        def part(idx: npt.NDArray[np.int64]) -> TextDataset:
            new = object.__new__(TextDataset)
            new.texts = tuple(self.texts[int(i)] for i in idx)
            new.labels = None if self.labels is None else self.labels[idx]
            new.max_length, new._tok, new.prompt, new._pad = self.max_length, self._tok, self.prompt, self._pad
            new.responses = None if self.responses is None else tuple(self.responses[int(i)] for i in idx)
            return new

        return part(keep), part(held)


def _check_labels(labels: npt.NDArray[np.int64] | None, classes: int | None, source: str) -> None:
    if labels is None:
        raise DataError(f"{source} has no labels but the graph needs a `labels` input")
    if classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(
            f"{source} has labels in [{labels.min()}, {labels.max()}] but the bundle predicts {classes} classes "
            f"(labels must be 0..{classes - 1})"
        )


def dataset_for_bundle(raw: RawData, bundle: Bundle, graph: str = "model") -> ArrayDataset | TextDataset:
    """Fit what a file holds to the data inputs of ``bundle``'s ``graph``."""
    spec: GraphSpec = bundle.manifest.graph(graph)
    names = [t.name for t in spec.data_inputs]
    classes = num_classes(bundle, graph)
    if raw.arrays is not None and all(n in raw.arrays for n in names):
        return ArrayDataset({n: np.ascontiguousarray(raw.arrays[n]) for n in names})
    if "input_ids" in names:
        if raw.texts is None:
            raise DataError(
                f"{raw.source} holds no text but bundle kind {bundle.manifest.kind!r} takes token ids; "
                "give a CSV with a title/description or text column"
            )
        labels = fit_labels(raw, bundle.manifest.labels)
        if labels is not None and raw.one_based_labels and classes is not None and labels.max() == classes:
            labels = labels - 1  # AG News labels 1..4
        if "labels" in names:
            _check_labels(labels, classes, raw.source)
        tok_spec = bundle.manifest.tokenizer
        tokenizer = load_tokenizer(bundle)
        pad_id = bundle.manifest.settings.get("pad_token_id")
        if not isinstance(pad_id, int):
            found = [tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>", "<|endoftext|>")]
            pad_id = next((i for i in found if i is not None), 0)
        assert tok_spec is not None  # load_tokenizer checked it
        template = bundle.manifest.settings.get("template")
        if "loss_mask" in names and raw.responses is None:
            raise DataError(f"bundle kind {bundle.manifest.kind!r} trains on responses (objective 'response') but "
                            f"{raw.source} holds no prompt/response pairs; give a CSV with prompt,response columns")
        return TextDataset(
            raw.texts,
            labels if "labels" in names else None,
            tokenizer,
            tok_spec.max_length,
            pad_id=int(pad_id),
            padding_side=tok_spec.padding_side,
            prompt=PromptTemplate(template) if isinstance(template, str) and template else None,
            responses=raw.responses if "loss_mask" in names else None,
        )
    if "x" in names:
        if raw.features is None:
            raise DataError(f"{raw.source} holds no numeric features but the graph takes `x`")
        x_spec = next(t for t in spec.data_inputs if t.name == "x")
        width = x_spec.shape[-1]
        if isinstance(width, int) and raw.features.shape[1] != width:
            raise DataError(
                f"{raw.source} has {raw.features.shape[1]} features per example but the bundle's `x` takes {width}"
            )
        arrays: dict[str, npt.NDArray[Any]] = {"x": np.ascontiguousarray(raw.features, dtype=np.float32)}
        if "labels" in names:
            labels = fit_labels(raw, bundle.manifest.labels)
            _check_labels(labels, classes, raw.source)
            assert labels is not None
            arrays["labels"] = labels
        return ArrayDataset(arrays)
    raise DataError(f"cannot build the inputs {names} of graph {graph!r} from {raw.source}")


def load_dataset(
    path: str | Path, bundle: Bundle, *, graph: str = "model", split: str = "train", label_column: str = "label"
) -> ArrayDataset | TextDataset:
    """Read ``path`` and fit it to ``bundle``'s graph: the one call ``fwdfleet device train`` makes."""
    return dataset_for_bundle(read_data(path, split=split, label_column=label_column), bundle, graph)


def vocabulary_size(bundle: Bundle) -> int | None:
    """The token-id range of ``bundle``'s text inputs: its tokenizer's vocabulary, else
    ``settings["vocab_size"]``; None when neither says."""
    tok = bundle.manifest.tokenizer
    for rel in tok.files if tok is not None else ():
        path = bundle.path / rel
        try:
            if path.name == "tokenizer.json":
                return len(json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"])
            if path.name == "vocab.txt":
                with path.open(encoding="utf-8") as f:
                    return sum(1 for _ in f)
        except (OSError, KeyError, TypeError, ValueError):
            continue
    vocab = bundle.manifest.settings.get("vocab_size")
    return int(vocab) if isinstance(vocab, int) else None


def synthetic_batch(
    bundle: Bundle, batch_size: int, *, graph: str = "model", sequence_length: int = 128, seed: int = 0
) -> Batch:
    """A random batch of the right names, dtypes and shapes (for memory and speed measurements)."""
    rng = np.random.default_rng(seed)
    high = max(6, min(vocabulary_size(bundle) or 1000, 1000))
    classes = num_classes(bundle, graph) or 2
    out: Batch = {}
    for t in bundle.manifest.graph(graph).data_inputs:
        shape = tuple(batch_size if d == "batch" else (d if isinstance(d, int) else sequence_length) for d in t.shape)
        if t.name == "labels":
            out[t.name] = rng.integers(0, classes, size=shape, dtype=np.int64)
        elif t.name == "attention_mask":
            out[t.name] = np.ones(shape, dtype=np.dtype(t.dtype))
        elif t.dtype in ("int64", "int32"):
            out[t.name] = rng.integers(5, high, size=shape).astype(t.dtype)
        elif t.dtype == "bool":
            out[t.name] = np.ones(shape, dtype=np.bool_)
        else:
            out[t.name] = rng.random(shape, dtype=np.float32).astype(t.dtype)
    return out

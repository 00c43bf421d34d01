"""Durable aggregator state: an atomic checkpoint after every applied update, plus journals.

Layout of a checkpoint folder::

    ckpt-00000012.npz   trainables (flat float32), optimizer state (arrays only, no pickle)
    latest.json         which .npz is current, its SHA-256, round counter, model version,
                        pacing state, seed/generator state and the config it was written with
    devices.jsonl       append-only registry journal: one line per joined device
    round.jsonl         journal of the round in progress: its opening (selection), deadline
                        decisions and every accepted upload, fsynced before the upload is
                        acknowledged; emptied after each checkpoint
    receipts.jsonl      fingerprints of counted uploads (the newest few per device), appended at each
                        checkpoint and compacted when it grows: a retried upload is acknowledged as a
                        duplicate after any number of restarts, whatever round it was for
    uploads/            the accepted dense-gradient / FedAvg vectors of the round in progress
                        (one atomic .npy each, named in round.jsonl); removed after each checkpoint

A checkpoint is written to a temporary file, fsynced, and moved into place with
``os.replace``; ``latest.json`` is replaced last, so a crash at any moment leaves either the
old or the new checkpoint, never a mix. The round counter is stored with the trainables it
produced: on restart the aggregator re-runs the first round not in the checkpoint, with the
same round seed (seeds derive from the master seed and the round id), so no update is lost or
applied twice; replaying ``round.jsonl`` restores what the round had already accepted.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fwdfleet.bundle import sha256_file
from fwdfleet.errors import FwdfleetError

FORMAT_VERSION = 1
LATEST = "latest.json"
DEVICES = "devices.jsonl"
ROUND_JOURNAL = "round.jsonl"
RECEIPTS = "receipts.jsonl"
UPLOADS = "uploads"


class CheckpointError(FwdfleetError):
    """A checkpoint folder is corrupt or was written by an incompatible configuration."""


@dataclass(frozen=True)
class CheckpointState:
    round_id: int  # the next round to run
    model_version: int  # number of updates applied
    trainables: np.ndarray  # flat float32, canonical order
    optimizer: Mapping[str, np.ndarray]
    pacing: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)  # seeds, config, anything JSON


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(directory: str | Path, state: CheckpointState) -> Path:
    """Write ``state`` atomically; returns the path of the new ``.npz``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"trainables": np.ascontiguousarray(state.trainables, dtype=np.float32)}
    for k, v in state.optimizer.items():
        arrays[f"optimizer/{k}"] = np.asarray(v)
    npz = d / f"ckpt-{state.model_version:08d}-r{state.round_id:08d}.npz"
    _atomic_write(npz, lambda f: np.savez(f, **arrays))
    latest = {
        "format": FORMAT_VERSION,
        "file": npz.name,
        "sha256": sha256_file(npz),
        "round_id": state.round_id,
        "model_version": state.model_version,
        "pacing": dict(state.pacing),
        "meta": dict(state.meta),
    }
    text = json.dumps(latest, indent=2, sort_keys=True).encode()
    _atomic_write(d / LATEST, lambda f: f.write(text))
    for old in d.glob("ckpt-*.npz"):
        if old.name != npz.name:
            old.unlink(missing_ok=True)
    return npz


def load_checkpoint(directory: str | Path) -> CheckpointState | None:
    """The last complete checkpoint in ``directory``, or None when there is none yet."""
    d = Path(directory)
    latest_path = d / LATEST
    if not latest_path.is_file():
        return None
    try:
        latest = json.loads(latest_path.read_text())
        npz = d / latest["file"]
        if latest.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{latest_path} has format {latest.get('format')}, this aggregator reads "
                                  f"{FORMAT_VERSION}; start from a new checkpoint folder")
        if sha256_file(npz) != latest["sha256"]:
            raise CheckpointError(f"{npz} does not match its checksum in {latest_path}: the checkpoint is "
                                  "corrupt; restore it from a backup or start a new checkpoint folder")
        with np.load(npz, allow_pickle=False) as z:
            trainables = np.array(z["trainables"], dtype=np.float32)
            optimizer = {k.split("/", 1)[1]: np.array(z[k]) for k in z.files if k.startswith("optimizer/")}
        return CheckpointState(round_id=int(latest["round_id"]), model_version=int(latest["model_version"]),
                               trainables=trainables, optimizer=optimizer, pacing=dict(latest["pacing"]),
                               meta=dict(latest["meta"]))
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the checkpoint in {d}: {e}; start a new checkpoint folder "
                              "or restore the folder") from e


class Journal:
    """An append-only JSON-lines file, fsynced per record; a torn last line (crash) is ignored."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def extend(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append several records with one fsync; returns how many."""
        lines = [json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records]
        if lines:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
        return len(lines)

    def rewrite(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Replace the journal by ``records`` (compaction), atomically; returns how many."""
        lines = [json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records]
        _atomic_write(self.path, lambda f: f.write("".join(lines).encode()))
        return len(lines)

    def reset(self) -> None:
        """Start an empty journal (atomically: a crash leaves the old or the empty one)."""
        _atomic_write(self.path, lambda f: None)

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn write from a crash: the record was never acknowledged
                yield json.loads(line)


def save_upload(directory: str | Path, round_id: int, tag: str, vector: np.ndarray) -> str:
    """Write an accepted vector upload of the round in progress atomically; returns its file name."""
    folder = Path(directory) / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    name = f"r{round_id:08d}-{tag}.npy"
    flat = np.ascontiguousarray(vector, dtype=np.float32)
    _atomic_write(folder / name, lambda f: np.save(f, flat, allow_pickle=False))
    return name


def load_upload(directory: str | Path, name: str) -> np.ndarray:
    path = Path(directory) / UPLOADS / name
    try:
        vector: np.ndarray = np.load(path, allow_pickle=False)
        return vector
    except (OSError, ValueError) as e:
        raise CheckpointError(f"journaled upload {path} cannot be read ({e}); the checkpoint folder is damaged") from e


def drop_uploads(directory: str | Path) -> None:
    """Remove the journaled vector uploads (after a checkpoint made them part of the trainables)."""
    for path in (Path(directory) / UPLOADS).glob("r*.npy"):
        path.unlink(missing_ok=True)

"""Verified downloads for the device: the bundle (resumable, sha256-checked, unpacked atomically)
and the current trainables (all chunks, one sha256).

The transport is the caller's: each function takes the chunk stream (``serde.DownloadChunk``s)
and checks offsets and digests, raising :class:`CorruptDownload` for anything that does not
verify, which :class:`device_runtime.client.DeviceClient` retries with backoff.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fwdfleet.bundle import sha256_file
from fwdfleet.errors import FwdfleetError
from fwdfleet.protocol.serde import DownloadChunk


class CorruptDownload(FwdfleetError):
    """A download that did not verify (wrong offset, changed or corrupted content): retry it."""


class UnsafeBundle(FwdfleetError):
    """A downloaded bundle archive holds a path outside its folder: never unpacked."""


def resume_download(part: Path, sha256: str, chunks_from: Callable[[int], Iterable[DownloadChunk]]) -> None:
    """Append to ``part`` the chunks ``chunks_from(offset)`` streams from where it stopped, then check
    the whole file's sha256 (a mismatch deletes ``part``, so the retry starts from scratch)."""
    offset = part.stat().st_size if part.exists() else 0
    with open(part, "ab") as f:
        for chunk in chunks_from(offset):
            if chunk.sha256 != sha256:
                part.unlink()
                raise CorruptDownload(f"the aggregator's bundle changed during the download ({chunk.sha256[:12]})")
            if chunk.offset != offset:
                raise CorruptDownload(f"download chunk at offset {chunk.offset}, expected {offset}")
            f.write(chunk.data)
            offset += len(chunk.data)
    actual = sha256_file(part)
    if actual != sha256:
        part.unlink()
        raise CorruptDownload(f"downloaded bundle has sha256 {actual[:12]}..., expected {sha256[:12]}...; retry")


def extract_bundle(zip_path: Path, target: Path) -> None:
    """Unpack a downloaded bundle zip into ``target`` (atomically: via a sibling temp folder)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as zf:
        for member in zf.namelist():
            if member.startswith("/") or ".." in Path(member).parts:
                raise UnsafeBundle(f"the downloaded bundle holds an unsafe path {member!r}; refusing it")
        zf.extractall(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def read_trainables(chunks: Iterable[DownloadChunk]) -> tuple[int, dict[str, np.ndarray]]:
    """``(model_version, tensors)`` from a ``DownloadTrainables`` stream (an ``.npz``), verified."""
    buf, digest, version = io.BytesIO(), "", 0
    for chunk in chunks:
        if chunk.offset != buf.tell():
            raise CorruptDownload(f"trainables chunk at offset {chunk.offset}, expected {buf.tell()}")
        buf.write(chunk.data)
        digest, version = chunk.sha256, chunk.model_version
    data = buf.getvalue()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CorruptDownload("downloaded trainables do not match their sha256; retrying")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return version, {name: np.array(z[name]) for name in z.files}

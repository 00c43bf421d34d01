"""The device's verified downloads: resumable bundle, atomic unpacking, checked trainables."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fwdfleet.device_runtime.downloads import (
    CorruptDownload,
    UnsafeBundle,
    extract_bundle,
    read_trainables,
    resume_download,
)
from fwdfleet.protocol.serde import DownloadChunk


def _chunks(data: bytes, offset: int, size: int = 7, digest: str | None = None) -> Iterator[DownloadChunk]:
    sha = digest or hashlib.sha256(data).hexdigest()
    for start in range(offset, len(data), size):
        yield DownloadChunk(start, data[start : start + size], len(data), sha, 3)


def test_resume_download_continues_where_it_stopped(tmp_path: Path) -> None:
    data = bytes(range(256)) * 3
    part = tmp_path / "b.part"
    part.write_bytes(data[:100])  # an earlier, interrupted attempt
    offsets: list[int] = []

    def chunks_from(offset: int) -> Iterator[DownloadChunk]:
        offsets.append(offset)
        return _chunks(data, offset)

    resume_download(part, hashlib.sha256(data).hexdigest(), chunks_from)
    assert offsets == [100] and part.read_bytes() == data


def test_resume_download_rejects_changed_or_corrupt_content(tmp_path: Path) -> None:
    data = b"x" * 50
    sha = hashlib.sha256(data).hexdigest()
    part = tmp_path / "b.part"
    with pytest.raises(CorruptDownload, match="changed during the download"):
        resume_download(part, sha, lambda o: _chunks(data, o, digest="0" * 64))
    assert not part.exists()
    with pytest.raises(CorruptDownload, match="offset 7, expected 0"):
        resume_download(part, sha, lambda o: _chunks(data, 7))
    part.unlink()
    with pytest.raises(CorruptDownload, match="has sha256"):  # right digest announced, wrong bytes sent
        resume_download(part, sha, lambda o: (DownloadChunk(0, b"y" * 50, 50, sha),))
    assert not part.exists()  # the retry starts from scratch


def test_extract_bundle_is_atomic_and_refuses_unsafe_paths(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("manifest.json", "{}")
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    extract_bundle(good, target)
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json"]
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(UnsafeBundle, match="unsafe path"):
        extract_bundle(bad, tmp_path / "other")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "other").exists()


def test_read_trainables_checks_the_digest(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, w=np.arange(6, dtype=np.float32).reshape(2, 3))
    data = buf.getvalue()
    version, tensors = read_trainables(_chunks(data, 0, size=64))
    assert version == 3 and tensors["w"].shape == (2, 3) and tensors["w"][1, 2] == 5
    with pytest.raises(CorruptDownload, match="do not match their sha256"):
        read_trainables(_chunks(data, 0, digest="0" * 64))

"""GGUF files (the llama.cpp ecosystem) as a source for ``fwdfleet export causal-lm``.

Edge users keep their LLMs as one ``.gguf`` file: weights (often quantized: Q4_0, Q4_1, Q8_0, ...),
the architecture's hyperparameters and the tokenizer, all in one place. transformers reads such a
file (``from_pretrained(folder, gguf_file=name)``) and dequantizes it to float32; its tokenizer
converts to a ``tokenizers`` tokenizer, so the bundle ships ``tokenizer.json`` as for any folder.

This module checks a file before the slow load (magic, header, tensor table, architecture) with
the ``gguf`` package, so a truncated download or an unsupported architecture is a one-line error
naming the cause, and says how :mod:`fwdfleet.export.hf` passes the file to transformers.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fwdfleet.errors import ExportError

SUFFIX = ".gguf"
# GGUF ``general.architecture`` -> transformers ``model_type`` for the families the causal-LM
# export supports (``export.hf.CAUSAL_LM_FAMILIES``).
ARCHITECTURES = {"llama": "llama", "gpt2": "gpt2"}


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == SUFFIX


def gguf_architecture(path: Path) -> str:
    """The file's ``general.architecture`` after checking that the whole file parses.

    Raises :class:`ExportError` for a missing ``gguf`` package, a file that is not GGUF, a
    truncated or corrupt one, and an architecture the exporter does not support.
    """
    try:
        import gguf
    except ImportError as e:
        raise ExportError("reading a GGUF file needs the gguf package: pip install 'fwdfleet[export]'") from e
    if not path.is_file():
        raise ExportError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))  # parses the header and maps every tensor's data
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError as e:
        raise ExportError(f"{path} has no general.architecture entry; it is not a model GGUF file") from e
    except (ValueError, IndexError, OSError, UnicodeDecodeError) as e:
        raise ExportError(
            f"{path} is not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
            "it is truncated or corrupt, or not GGUF at all; download or convert it again"
        ) from e
    if arch not in ARCHITECTURES:
        raise ExportError(
            f"{path.name}: GGUF architecture {arch!r} is not supported by `fwdfleet export causal-lm`; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return arch


@contextlib.contextmanager
def quiet_dequantization(path: Path) -> Iterator[None]:
    """transformers draws an unconditional tqdm bar while it dequantizes a GGUF file: keep it off
    the user's terminal (errors still arrive as exceptions)."""
    if not is_gguf(path):
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def from_pretrained_args(path: Path) -> tuple[Path, dict[str, Any]]:
    """Where transformers' ``from_pretrained`` should look, and the extra keyword for a GGUF file."""
    return (path.parent, {"gguf_file": path.name}) if is_gguf(path) else (path, {})

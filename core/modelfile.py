"""The `convserve/1` model file: one safetensors file, architecture JSON in its metadata."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from convserve.core.errors import ModelError
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FORMAT = "convserve/1"
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and check a model file; returns (architecture document, tensors by name)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"model file {path}: no such file") from None
    except OSError as exc:
        raise ModelError(f"model file {path}: cannot read: {exc.strerror or exc}") from None
    return parse_model_bytes(data, str(path))


def parse_model_bytes(
    data: bytes, where: str = "model file"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse the bytes of a model file (see `read_model_file`)."""
    if len(data) < 8:
        raise ModelError(f"{where}: not a safetensors file: {len(data)} bytes, expected at least 8")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise ModelError(
            f"{where}: not a safetensors file or truncated: header length {header_len} bytes, "
            f"but the file has {len(data) - 8} bytes after the length field"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{where}: safetensors header must be a JSON object")
    metadata = header.get("__metadata__") or {}
    tag = metadata.get("format")
    if tag != FORMAT:
        raise ModelError(f"{where}: metadata 'format' is {tag!r}, expected {FORMAT!r}")
    if "architecture" not in metadata:
        raise ModelError(f"{where}: metadata has no 'architecture'")
    try:
        architecture = json.loads(metadata["architecture"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where}: metadata 'architecture' is not valid JSON: {exc}") from None
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise ModelError(f"{where}: corrupt safetensors data: {exc}") from None
    return architecture, tensors


def read_model_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of a model file (format, architecture, source, ...)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as handle:
            return dict(handle.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"model file {path}: cannot read metadata: {exc}") from None


def write_model_file(
    path: str | os.PathLike,
    architecture: dict[str, Any],
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a model file atomically (see `atomic_write`); `metadata` adds string entries
    (such as `source`, where an imported model came from) next to format and architecture."""
    metadata = {**(metadata or {}), "format": FORMAT, "architecture": json.dumps(architecture)}
    atomic_write(
        path, st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    )


def atomic_write(path: str | os.PathLike, payload: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(
            tmp, 0o666 & ~umask
        )  # mkstemp makes 0600; model files are read by other users (the server)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

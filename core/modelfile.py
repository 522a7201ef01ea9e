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
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FORMAT = "convserve/1"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MESSAGE_CHARS = 400  # a hostile file can put megabytes into one value: messages are cut


def one_line(message: str, limit: int = MESSAGE_CHARS) -> str:
    """`message` on one line and at most `limit` characters."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problem(where: str, message: str) -> ModelError:
    return ModelError(one_line(f"{where}: {message}"))


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and check a model file; returns (architecture document, tensors by name)."""
    path = Path(path)
    where = f"model file {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _problem(where, "no such file") from None
    except OSError as exc:
        raise _problem(where, f"cannot read: {exc.strerror or exc}") from None
    return parse_model_bytes(data, where)


def _json(text: str | bytes, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise _problem(where, f"{what} is nested too deeply to be a model") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long
        raise _problem(where, f"{what} is not valid JSON: {exc}") from None


def _header_metadata(data: bytes, payload_bytes: int, where: str) -> dict[str, Any]:
    """The `__metadata__` object of a safetensors header; `data` starts at the length field and
    holds at least the header, `payload_bytes` is how many bytes follow the length field."""
    if len(data) < 8:
        raise _problem(where, f"not a safetensors file: {len(data)} bytes, expected at least 8")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or header_len > payload_bytes:
        raise _problem(
            where,
            f"not a safetensors file or truncated: header length {header_len} bytes, "
            f"but the file has {payload_bytes} bytes after the length field",
        )
    header = _json(data[8 : 8 + header_len], where, "the safetensors header")
    if not isinstance(header, dict):
        raise _problem(
            where, f"the safetensors header must be a JSON object, got {type(header).__name__}"
        )
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise _problem(
            where,
            "the safetensors '__metadata__' must be an object of strings, got "
            f"{type(metadata).__name__}",
        )
    return metadata


def parse_model_bytes(
    data: bytes, where: str = "model file"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse the bytes of a model file (see `read_model_file`); any problem raises `ModelError`
    with one line starting with `where`."""
    metadata = _header_metadata(data, len(data) - 8, where)
    tag = metadata.get("format")
    if tag != FORMAT:
        raise _problem(where, f"metadata 'format' is {tag!r}, expected {FORMAT!r}")
    text = metadata.get("architecture")
    if text is None:
        raise _problem(where, "metadata has no 'architecture'")
    if not isinstance(text, str):
        raise _problem(
            where, f"metadata 'architecture' must be a JSON string, got {type(text).__name__}"
        )
    architecture = _json(text, where, "metadata 'architecture'")
    try:
        tensors = st_load(data)
    except BaseException as exc:  # noqa: BLE001 - a Rust panic arrives as pyo3's PanicException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise _problem(where, f"corrupt safetensors data: {exc}") from None
    return architecture, tensors


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The safetensors metadata of a model file (format, architecture, source, ...), reading only
    its header; any problem raises `ModelError` with one line naming the file."""
    where = f"model file {path}"
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            if len(head) == 8:
                (header_len,) = struct.unpack("<Q", head)
                head += handle.read(min(header_len, MAX_HEADER_BYTES))
    except OSError as exc:
        raise _problem(where, f"cannot read: {exc.strerror or exc}") from None
    return _header_metadata(head, size - 8, where)


def write_model_file(
    path: str | os.PathLike,
    architecture: dict[str, Any],
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a model file atomically (see `atomic_write`); `metadata` adds string entries
    (such as `source`, where an imported model came from) next to format and architecture."""
    metadata = {**(metadata or {}), "format": FORMAT, "architecture": json.dumps(architecture)}
    payload = st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, canonical_header(payload))


def canonical_header(payload: bytes) -> bytes:
    """`payload` (a safetensors file) with its header's keys in sorted order. safetensors writes
    the metadata from a Rust hash map, whose order changes from one call to the next: without
    this, the same weights and metadata gave files that differ in a few header bytes."""
    (length,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data keeps safetensors' 8-byte alignment
    return struct.pack("<Q", len(text)) + text + payload[8 + length :]


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

"""Real Fashion-MNIST test images as Open Inference Protocol requests, and answer checking.

Reads the IDX files (gzip or plain) directly with NumPy, so the load generator needs neither
the core nor Pillow. Used by `locustfile.py`; usable alone:

    from mnist_requests import load_images, build_requests
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
from convserve.proto import grpc_service_pb2 as pb

DEFAULT_DATASET = "/usr/share/datasets/fashion-mnist"
IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (`*-idx3-ubyte[.gz]`) as a NumPy array of its declared shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    dtype, ndim = data[2], data[3]
    if dtype not in IDX_DTYPES:
        raise ValueError(
            f"{path}: IDX element type 0x{dtype:02x} is not supported (expected 0x08, unsigned byte)"
        )
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, IDX_DTYPES[dtype], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says shape {list(shape)} ({int(np.prod(shape))} values), file holds {body.size}"
        )
    return body.reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {directory} (install the Debian package dataset-fashion-mnist)"
    )


def load_images(
    directory: str = DEFAULT_DATASET, split: str = "t10k"
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28, 1), labels int64 (N,)) of a Fashion-MNIST split (`t10k` or `train`)."""
    images = read_idx(_find(directory, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"{directory}: {split} images {list(images.shape)} and labels {list(labels.shape)} do not match"
        )
    return images[..., None], labels.astype(np.int64)


@dataclass(frozen=True)
class PreparedRequest:
    """One ModelInferRequest and the true labels of its images."""

    message: pb.ModelInferRequest
    labels: np.ndarray


def build_requests(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    per_request: int,
    model: str,
    version: str = "",
    top_k: int = 0,
    limit: int = 2000,
    input_name: str = "input",
    output_name: str = "probabilities",
) -> list[PreparedRequest]:
    """Consecutive slices of `per_request` images as UINT8 raw-content requests (at most `limit`).

    `top_k` > 0 asks for Triton's classification extension (top-k "value:index:label"
    strings) on the output instead of the probabilities.
    """
    if per_request < 1:
        raise ValueError(f"images per request must be >= 1, got {per_request}")
    if per_request > images.shape[0]:
        raise ValueError(
            f"images per request is {per_request}, but the data set holds only {images.shape[0]} images"
        )
    if top_k < 0:
        raise ValueError(f"top-k must be >= 0 (0 = probabilities), got {top_k}")
    count = min(limit, images.shape[0] // per_request)
    prepared = []
    for i in range(count):
        batch = np.ascontiguousarray(images[i * per_request : (i + 1) * per_request])
        request = pb.ModelInferRequest(model_name=model, model_version=version, id=f"loadtest-{i}")
        tensor = request.inputs.add(name=input_name, datatype="UINT8")
        tensor.shape.extend(batch.shape)
        output = request.outputs.add(name=output_name)
        if top_k:
            output.parameters["classification"].int64_param = top_k
        request.raw_input_contents.append(batch.tobytes())
        prepared.append(
            PreparedRequest(request, labels[i * per_request : (i + 1) * per_request].copy())
        )
    return prepared


def _bytes_elements(raw: bytes) -> list[bytes]:
    """Split a BYTES tensor's raw form: 4-byte little-endian length, then the bytes, repeated."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ValueError(
                f"BYTES tensor truncated: a length prefix at offset {pos} of {len(raw)}"
            )
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ValueError(
                f"BYTES tensor truncated: element of {n} bytes at offset {pos} of {len(raw)}"
            )
        items.append(raw[pos : pos + n])
        pos += n
    return items


def top1(
    response: pb.ModelInferResponse,
    rows: int,
    *,
    top_k: int = 0,
    num_classes: int = 10,
    output_name: str = "probabilities",
) -> np.ndarray:
    """Check a response's shape and framing; returns the top-1 class index of each image.

    Raises ValueError saying what was expected and what came.
    """
    names = [o.name for o in response.outputs]
    if output_name not in names:
        raise ValueError(f"output '{output_name}' missing from the response (got {names})")
    index = names.index(output_name)
    out = response.outputs[index]
    if index >= len(response.raw_output_contents):
        raise ValueError(
            f"output '{output_name}' has no raw_output_contents entry "
            f"({len(response.raw_output_contents)} entries for {len(names)} outputs)"
        )
    raw = response.raw_output_contents[index]
    if top_k:
        k = min(top_k, num_classes)
        if out.datatype != "BYTES" or list(out.shape) != [rows, k]:
            raise ValueError(
                f"classification output: expected BYTES [{rows}, {k}], got {out.datatype} {list(out.shape)}"
            )
        items = _bytes_elements(raw)
        if len(items) != rows * k:
            raise ValueError(
                f"classification output: expected {rows * k} strings, got {len(items)}"
            )
        return np.array([int(items[r * k].split(b":")[1]) for r in range(rows)], np.int64)
    if out.datatype != "FP32" or list(out.shape) != [rows, num_classes]:
        raise ValueError(
            f"probabilities: expected FP32 [{rows}, {num_classes}], got {out.datatype} {list(out.shape)}"
        )
    if len(raw) != rows * num_classes * 4:
        raise ValueError(f"probabilities: expected {rows * num_classes * 4} bytes, got {len(raw)}")
    probs = np.frombuffer(raw, "<f4").reshape(rows, num_classes)
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or Inf")
    return probs.argmax(axis=1)

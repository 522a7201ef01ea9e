"""Malformed and absurd model files, made at test time (not a test module).

`hostile_files()` maps a case name to the bytes of a file that must be refused with a one-line
`ModelError`, and to a fragment that message must contain.
"""

from __future__ import annotations

import json
import struct

import numpy as np
from convserve.core.modelfile import FORMAT
from convserve.core.presets import preset
from safetensors.numpy import save

from tests.conftest import random_weights


def raw_file(header: object, data: bytes = b"") -> bytes:
    """A safetensors container around any JSON header (or raw header bytes)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def model_bytes(document: dict, tensors: dict[str, np.ndarray]) -> bytes:
    metadata = {"format": FORMAT, "architecture": json.dumps(document)}
    return save(tensors, metadata=metadata)


def lenet() -> tuple[dict, dict[str, np.ndarray]]:
    document = preset("lenet5")
    return document, random_weights(document, seed=7)


def absurd_architecture() -> dict:
    """The issue's case: two tiny tensors, yet 37 GiB of activations per image."""
    return {
        "name": "absurd",
        "input": {"shape": [100000, 100000, 1]},
        "layers": [
            {"type": "max_pooling2d", "pool_size": 100000},
            {"type": "flatten"},
            {"type": "dense", "units": 1},
        ],
    }


def hostile_files() -> dict[str, tuple[bytes, str]]:
    document, weights = lenet()
    valid = model_bytes(document, weights)
    first = next(iter(weights))
    header_len = struct.unpack("<Q", valid[:8])[0]

    def with_tensors(**changes) -> bytes:
        tensors = dict(weights)
        for name, value in changes.items():
            key = name.replace("__", ".")
            if value is None:
                tensors.pop(key)
            else:
                tensors[key] = value
        return model_bytes(document, tensors)

    def with_document(**changes) -> bytes:
        return model_bytes({**document, **changes}, weights)

    layer0 = document["layers"][0]
    return {
        "empty": (b"", "not a safetensors file"),
        "seven bytes": (b"\x01" * 7, "not a safetensors file"),
        "huge header length": (struct.pack("<Q", 2**63) + b"{}", "header length"),
        "truncated": (valid[: len(valid) // 2], "corrupt safetensors data"),
        "truncated header": (valid[: 8 + header_len // 2], "truncated"),
        "header not JSON": (raw_file(b"{nope"), "not valid JSON"),
        "header not UTF-8": (raw_file(b'{"\xff": 1}'), "not valid JSON"),
        "header a list": (raw_file(["x"]), "must be a JSON object"),
        "header nested 100,000 deep": (raw_file(b"[" * 100_000), "nested too deeply"),
        "metadata an integer": (raw_file({"__metadata__": 1}), "'__metadata__' must be an object"),
        "metadata a list": (raw_file({"__metadata__": ["x"]}), "'__metadata__' must be an object"),
        "no metadata": (raw_file({}), "metadata 'format' is None"),
        "no architecture": (raw_file({"__metadata__": {"format": FORMAT}}), "no 'architecture'"),
        "architecture 50,000 [": (
            raw_file({"__metadata__": {"format": FORMAT, "architecture": "[" * 50_000}}),
            "nested too deeply",
        ),
        "architecture a list": (
            raw_file({"__metadata__": {"format": FORMAT, "architecture": "[1]"}}),
            "must be a JSON object",
        ),
        "architecture an integer of 5000 digits": (
            raw_file({"__metadata__": {"format": FORMAT, "architecture": "9" * 5000}}),
            "not valid JSON",
        ),
        "unknown layer type": (
            with_document(layers=[{"type": "lstm"}, *document["layers"][1:]]),
            "unknown layer type 'lstm'",
        ),
        "layer not an object": (with_document(layers=[[[[]]]]), "must be a JSON object"),
        "filters as a string": (
            with_document(layers=[{**layer0, "filters": "6"}, *document["layers"][1:]]),
            "'filters' must be an integer",
        ),
        "missing tensor": (with_tensors(**{first.replace(".", "__"): None}), "missing tensor"),
        "extra tensor": (with_tensors(extra=np.zeros(3, np.float32)), "unexpected tensor"),
        "float64 tensor": (
            with_tensors(**{first.replace(".", "__"): weights[first].astype(np.float64)}),
            "dtype float64",
        ),
        "int32 tensor": (
            with_tensors(**{first.replace(".", "__"): weights[first].astype(np.int32)}),
            "dtype int32",
        ),
        "wrong shape": (
            with_tensors(**{first.replace(".", "__"): weights[first].reshape(-1)}),
            "has shape",
        ),
        "NaN weight": (
            with_tensors(**{first.replace(".", "__"): np.full_like(weights[first], np.nan)}),
            "NaN or Inf",
        ),
        "offsets past the end": (
            raw_file(
                {
                    "__metadata__": {"format": FORMAT, "architecture": json.dumps(document)},
                    "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]},
                },
                b"\0" * 16,
            ),
            "corrupt safetensors data",
        ),
        "bfloat16 tensor": (
            raw_file(
                {
                    "__metadata__": {"format": FORMAT, "architecture": json.dumps(document)},
                    "w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
                },
                b"\0" * 4,
            ),
            "",  # refused either as data numpy cannot hold or as an unexpected tensor
        ),
        "absurd activations": (
            model_bytes(
                absurd_architecture(),
                {
                    "layers.2.kernel": np.zeros((1, 1), np.float32),
                    "layers.2.bias": np.zeros(1, np.float32),
                },
            ),
            "above the limit",
        ),
        "billions of parameters": (
            with_document(
                input={"shape": [4096, 4096, 3]},
                layers=[{"type": "flatten"}, {"type": "dense", "units": 100}],
                labels=None,
            ),
            "parameter count is 5,033,164,900",
        ),
    }

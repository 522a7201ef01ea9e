"""The load test's request builder and answer checker (loadtest/mnist_requests.py), no server needed.

The locust run itself is exercised for real by .ci/loadtest-smoke.sh against a live server.
"""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "loadtest"))

import mnist_requests as mr  # noqa: E402
from convserve.proto import grpc_service_pb2 as pb  # noqa: E402


@pytest.fixture(scope="module")
def test_set():
    return mr.load_images()


def test_reads_the_real_test_set(test_set):
    images, labels = test_set
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
    assert labels[:3].tolist() == [9, 2, 1]  # Ankle boot, Pullover, Trouser (examples/labels.csv)
    assert 60 < images.mean() < 90  # real pictures, not zeros


def test_bad_idx_files_are_refused(tmp_path):
    bad = tmp_path / "bad-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x01\x02\x08\x03" + b"\0" * 12))
    with pytest.raises(ValueError, match="not an IDX file"):
        mr.read_idx(str(bad))
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 5) + b"\1\2")
    with pytest.raises(ValueError, match=r"header says shape \[5\]"):
        mr.read_idx(str(short))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        mr.load_images(str(tmp_path))


def test_requests_carry_consecutive_images(test_set):
    images, labels = test_set
    prepared = mr.build_requests(
        images, labels, per_request=8, model="fashion_mnist", top_k=3, limit=5
    )
    assert len(prepared) == 5
    second = prepared[1]
    msg = second.message
    assert msg.model_name == "fashion_mnist" and msg.model_version == ""
    assert msg.inputs[0].name == "input" and msg.inputs[0].datatype == "UINT8"
    assert list(msg.inputs[0].shape) == [8, 28, 28, 1]
    assert msg.raw_input_contents[0] == images[8:16].tobytes()
    assert msg.outputs[0].parameters["classification"].int64_param == 3
    assert second.labels.tolist() == labels[8:16].tolist()
    plain = mr.build_requests(images, labels, per_request=1, model="m", limit=1)[0].message
    assert "classification" not in plain.outputs[0].parameters
    with pytest.raises(ValueError, match="images per request must be >= 1"):
        mr.build_requests(images, labels, per_request=0, model="m")


def _response(datatype, shape, raw):
    response = pb.ModelInferResponse(model_name="fashion_mnist")
    response.outputs.add(name="probabilities", datatype=datatype, shape=shape)
    response.raw_output_contents.append(raw)
    return response


def test_top1_reads_probabilities_and_classifications():
    probs = np.zeros((2, 10), np.float32)
    probs[0, 7], probs[1, 2] = 0.9, 0.8
    assert mr.top1(_response("FP32", [2, 10], probs.tobytes()), 2).tolist() == [7, 2]
    items = [
        b"0.900000:7:Sneaker",
        b"0.050000:5:Sandal",
        b"0.800000:2:Pullover",
        b"0.100000:4:Coat",
    ]
    raw = b"".join(struct.pack("<I", len(s)) + s for s in items)
    assert mr.top1(_response("BYTES", [2, 2], raw), 2, top_k=2).tolist() == [7, 2]


@pytest.mark.parametrize(
    "datatype, shape, raw, top_k, message",
    [
        ("FP32", [2, 10], b"\0" * 40, 0, "expected 80 bytes"),
        ("FP32", [1, 10], b"\0" * 40, 0, r"expected FP32 \[2, 10\]"),
        ("BYTES", [2, 1], struct.pack("<I", 9) + b"abc", 1, "truncated"),
    ],
)
def test_top1_refuses_malformed_answers(datatype, shape, raw, top_k, message):
    with pytest.raises(ValueError, match=message):
        mr.top1(_response(datatype, shape, raw), 2, top_k=top_k)

"""Triton's own Python client (`tritonclient.grpc`) works against convserve unchanged."""

from __future__ import annotations

import queue

import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests import server_harness as h  # noqa: E402


@pytest.fixture(scope="module")
def client():
    server = h.main_server()
    with tc.InferenceServerClient(server.target) as c:
        yield c


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashion") and client.is_model_ready("fashion", "1")
    assert not client.is_model_ready("fashion", "5")
    with pytest.raises(
        InferenceServerException, match="Request for unknown model: 'ghost' is not found"
    ):
        client.is_model_ready("ghost")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "convserve" and "classification" in meta["extensions"]
    model = client.get_model_metadata("fashion", as_json=True)
    assert model["versions"] == ["1", "2"]
    assert model["inputs"][0] == {
        "name": "input",
        "datatype": "UINT8",
        "shape": ["-1", "28", "28", "1"],
    }
    assert model["outputs"][0] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": ["-1", "10"],
    }
    config = client.get_model_config("fashion", as_json=True)["config"]
    assert config["max_batch_size"] == 64 and config["input"][0]["format"] == "FORMAT_NHWC"
    assert config["input"][0]["dims"] == ["28", "28", "1"] and config["output"][0]["dims"] == ["10"]
    stats = client.get_inference_statistics("lenet", as_json=True)
    assert stats["model_stats"][0]["name"] == "lenet"


def _input(x: np.ndarray, datatype: str):
    inp = tc.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_infer_uint8_and_fp32(client, datatype):
    x = h.images(4, seed=51)
    data = x if datatype == "UINT8" else x.astype(np.float32)
    result = client.infer(
        "fashion",
        [_input(data, datatype)],
        outputs=[tc.InferRequestedOutput("probabilities")],
        request_id="t-1",
    )
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (4, 10)
    np.testing.assert_allclose(probs, h.local_model("fashion", 2).predict(x), rtol=1e-5, atol=1e-7)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("t-1", "fashion", "2")


def test_class_count_and_version(client):
    x = h.images(2, seed=52)
    result = client.infer(
        "fashion",
        [_input(x, "UINT8")],
        model_version="1",
        outputs=[tc.InferRequestedOutput("probabilities", class_count=3)],
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    probs = h.local_model("fashion", 1).predict(x)
    labels = h.local_model("fashion", 1).labels
    for row in range(2):
        top = int(np.argmax(probs[row]))
        score, index, label = classes[row, 0].decode().split(":", 2)
        assert (int(index), label) == (top, labels[top])
        assert abs(float(score) - probs[row, top]) < 1e-6


def test_priority_and_timeout_arguments(client):
    x = h.images(1, seed=53)
    result = client.infer("lenet", [_input(x, "UINT8")], priority=1, timeout=5_000_000)
    assert result.as_numpy("probabilities").shape == (1, 10)


def test_client_timeout_and_errors(client):
    x = h.images(900, seed=54)  # long enough that 1 ms cannot do
    with pytest.raises(InferenceServerException) as info:
        client.infer("fashion", [_input(x, "UINT8")], client_timeout=0.001)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    with pytest.raises(InferenceServerException) as info:
        client.infer("fashion", [_input(x[:1, :27], "UINT8")])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "Expected [-1,28,28,1], got [1,27,28,1]" in info.value.message()


def test_async_infer(client):
    done: queue.Queue = queue.Queue()
    x = h.images(8, seed=55)
    for i in range(8):
        client.async_infer(
            "fashion",
            [_input(x[i : i + 1], "UINT8")],
            callback=lambda result, error, i=i: done.put((i, result, error)),
            request_id=str(i),
        )
    expected = h.local_model("fashion", 2).predict(x)
    seen = set()
    for _ in range(8):
        i, result, error = done.get(timeout=60)
        assert error is None
        assert result.get_response().id == str(i)
        np.testing.assert_allclose(
            result.as_numpy("probabilities")[0], expected[i], rtol=1e-5, atol=1e-7
        )
        seen.add(i)
    assert seen == set(range(8))

"""Files made by hand (no Keras, no PyTorch): a .keras zip written with h5py checked against a
NumPy reference, and malformed or hostile files that must give one line, never a traceback."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from convserve.core.interop import UnsupportedModel
from convserve.core.interop.convert import import_model
from convserve.core.model import Model

h5py = pytest.importorskip("h5py")
onnx = pytest.importorskip("onnx")


def keras_zip(layers: list[dict], weights: dict[str, list[np.ndarray]]) -> bytes:
    """A .keras file: config.json + model.weights.h5 (layers/<key>/vars/<i>, attr name)."""
    config = {
        "module": "keras",
        "class_name": "Sequential",
        "config": {"name": "hand", "layers": layers},
    }
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        for key, arrays in weights.items():
            group = handle.create_group(f"layers/{key}/vars")
            group.attrs["name"] = f"my_{key}"
            for i, array in enumerate(arrays):
                group.create_dataset(str(i), data=array)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", buffer.getvalue())
    return out.getvalue()


def layer(kind: str, name: str, **config) -> dict:
    return {"module": "keras.layers", "class_name": kind, "config": {"name": name, **config}}


HAND_LAYERS = [
    layer("InputLayer", "in", batch_shape=[None, 6, 6, 2]),
    layer(
        "Conv2D",
        "my_conv2d",
        filters=3,
        kernel_size=[3, 3],
        strides=[1, 1],
        padding="valid",
        activation="relu",
    ),
    layer("Flatten", "flat"),
    layer("Dense", "my_dense", units=4, activation="softmax"),
]


def test_handmade_keras_file_matches_a_numpy_reference(tmp_path):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    dense = rng.standard_normal((48, 4)).astype(np.float32)
    dense_bias = rng.standard_normal(4).astype(np.float32)
    path = tmp_path / "hand.keras"
    path.write_bytes(
        keras_zip(HAND_LAYERS, {"conv2d": [kernel, bias], "dense": [dense, dense_bias]})
    )
    import_model(path, tmp_path / "hand.safetensors")
    model = Model.load(tmp_path / "hand.safetensors")

    x = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)
    conv = np.zeros((2, 4, 4, 3))
    for i in range(4):
        for j in range(4):
            conv[:, i, j] = np.einsum("nhwc,hwcf->nf", x[:, i : i + 3, j : j + 3], kernel) + bias
    logits = np.maximum(conv, 0).reshape(2, -1) @ dense + dense_bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert np.abs(model.predict(x) - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "layers,fragment",
    [
        ([1, 2], "malformed keras file"),
        ([layer("InputLayer", "in", batch_shape=[None, 6, 6])], "static image input"),
        (HAND_LAYERS[:2], "weight 'kernel' not found"),
        ([HAND_LAYERS[0], layer("Conv2D", "c", filters=3, kernel_size="big")], "kernel"),
    ],
)
def test_malformed_keras_files_are_one_line(tmp_path, layers, fragment):
    path = tmp_path / "bad.keras"
    path.write_bytes(keras_zip(layers, {}))
    with pytest.raises(UnsupportedModel) as caught:
        import_model(path, tmp_path / "x.safetensors")
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def onnx_file(path, nodes, inits, dims=("N", 1, 4, 4)) -> None:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())


def test_hostile_onnx_graphs_are_one_line(tmp_path):
    from onnx import helper

    w = np.ones((2, 1, 3, 3), np.float32)
    cases = {
        "strings.onnx": (
            [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=["a", "b"])],
            {"w": w},
        ),
        "no_weight.onnx": ([helper.make_node("Conv", ["x", "missing"], ["y"])], {}),
        "rank.onnx": ([helper.make_node("Conv", ["x", "w"], ["y"])], {"w": np.ones(3, np.float32)}),
        "huge.onnx": (
            [
                helper.make_node("ConstantOfShape", ["s"], ["c"]),
                helper.make_node("Add", ["x", "c"], ["y"]),
            ],
            {"s": np.array([10**6, 10**6], np.int64)},
        ),
    }
    fragments = {
        "strings.onnx": "malformed onnx file",
        "no_weight.onnx": "'missing' is neither an initializer",
        "rank.onnx": "rank 1, expected 4",
        "huge.onnx": "too large",
    }
    for name, (nodes, inits) in cases.items():
        onnx_file(tmp_path / name, nodes, inits)
        done = subprocess.run(
            [sys.executable, "-m", "convserve", "import", str(tmp_path / name), "--out", str(tmp_path / "x.st")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1, (name, done.stdout)
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, (name, done.stderr)
        assert fragments[name] in done.stderr, done.stderr
    onnx_file(
        tmp_path / "symbolic.onnx", [helper.make_node("Relu", ["x"], ["y"])], {}, ("N", 1, "H", "W")
    )
    with pytest.raises(UnsupportedModel, match="static image shape"):
        import_model(tmp_path / "symbolic.onnx", tmp_path / "x.st")
    assert not (tmp_path / "x.st").exists()


def test_tf2onnx_shaped_nhwc_graph(tmp_path):
    """NHWC input -> Transpose -> Conv (TF 'same' as explicit pads) -> Relu -> MaxPool ->
    Transpose to NHWC -> Reshape -> MatMul + Add -> Softmax, as tf2onnx writes a Keras model."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    hwio = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    consts = {
        "W": np.ascontiguousarray(hwio.transpose(3, 2, 0, 1)),
        "B": rng.standard_normal(4).astype(np.float32),
        "shape": np.array([-1, 144], np.int64),
        "K": rng.standard_normal((144, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p"], ["q"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["q", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "K"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Softmax", ["a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 12, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    (tmp_path / "tf.onnx").write_bytes(model.SerializeToString())
    import_model(tmp_path / "tf.onnx", tmp_path / "tf.safetensors")
    ours = Model.load(tmp_path / "tf.safetensors")
    assert [la.type for la in ours.architecture.layers] == [
        "conv2d",
        "max_pooling2d",
        "flatten",
        "dense",
    ]
    assert np.array_equal(ours.weights["layers.0.kernel"], hwio)  # bit for bit, no permutation
    x = rng.standard_normal((3, 12, 12, 3)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.abs(ours.predict(x) - session.run(None, {"x": x})[0]).max() <= 1e-5

"""The core's public API: construction, shapes, summary, files, and every kind of bad input."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from convserve.core import Model, ModelError
from convserve.core.architecture import parse_architecture, same_padding
from convserve.core.modelfile import FORMAT, read_model_file
from convserve.core.presets import PRESET_NAMES, preset

from tests.conftest import random_weights

BUNDLED = (
    Path(__file__).resolve().parents[1] / "models" / "fashion_mnist" / "1" / "model.safetensors"
)


def test_reference_shapes_and_parameter_count(reference_model):
    shapes = [layer.output_shape for layer in reference_model.architecture.layers]
    assert shapes == [(26, 26, 64), (13, 13, 64), (11, 11, 64), (5, 5, 64), (1600,), (128,), (10,)]
    assert reference_model.architecture.param_count() == 243_786
    assert reference_model.input_shape == (28, 28, 1)
    assert reference_model.name == "fashion_mnist"
    assert reference_model.labels[0] == "T-shirt/top" and reference_model.num_classes == 10


def test_summary_lists_shapes_and_total(reference_model):
    text = reference_model.summary()
    for shape in ("26x26x64", "13x13x64", "11x11x64", "5x5x64", "1600", "128"):
        assert shape in text
    assert "Total params: 243,786" in text
    assert "36,928" in text and "204,928" in text


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_parse(name):
    arch = parse_architecture(preset(name))
    assert arch.output_shape == (10,)


def test_same_padding_matches_tensorflow_arithmetic():
    # TF: out = ceil(in / stride); total = max((out - 1) * stride + k - in, 0), half before.
    assert same_padding(28, 3, 1) == (1, 1)
    assert same_padding(28, 4, 1) == (1, 2)
    assert same_padding(7, 3, 2) == (1, 1)
    assert same_padding(8, 3, 2) == (0, 1)
    assert same_padding(5, 1, 3) == (0, 0)


def test_save_load_roundtrip_gives_identical_predictions(tmp_path, reference_model):
    path = tmp_path / "m.safetensors"
    reference_model.save(path)
    loaded = Model.load(path)
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_array_equal(loaded.predict(images), reference_model.predict(images))
    document, tensors = read_model_file(path)
    assert document == reference_model.architecture.to_dict()
    assert set(tensors) == set(reference_model.weights)
    assert not list(tmp_path.glob(".m.safetensors.*")), "temporary file left behind"
    assert path.stat().st_mode & 0o044, "model file must be readable by the server's user, not 0600"


def test_saving_the_same_model_twice_gives_the_same_bytes(tmp_path, reference_model):
    """safetensors orders the header's metadata by a Rust hash map, which differs from call to
    call; the saved file must not (a trained model is reproduced bit for bit)."""
    from convserve.core.modelfile import write_model_file

    document = reference_model.architecture.to_dict()
    metadata = {f"key{i}": f"value {i}" for i in range(6)}
    files = []
    for i in range(8):
        path = tmp_path / f"m{i}.safetensors"
        write_model_file(path, document, reference_model.weights, metadata)
        files.append(path.read_bytes())
    assert all(data == files[0] for data in files)
    (length,) = struct.unpack("<Q", files[0][:8])
    assert length % 8 == 0
    header = json.loads(files[0][8 : 8 + length])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    loaded = Model.load(tmp_path / "m0.safetensors")
    for name, tensor in reference_model.weights.items():
        np.testing.assert_array_equal(loaded.weights[name], tensor)


def test_predict_accepts_single_image_and_float_pixels(reference_model):
    image = np.random.default_rng(2).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    single = reference_model.predict(image)
    assert single.shape == (1, 10) and single.dtype == np.float32
    np.testing.assert_allclose(single.sum(axis=1), 1.0, rtol=1e-5)
    as_float = reference_model.predict(image.astype(np.float32))
    np.testing.assert_allclose(as_float, single, atol=1e-6)
    forward = reference_model.forward((image[None] / np.float32(255)).astype(np.float32))
    np.testing.assert_allclose(forward, single, atol=1e-6)


# -- bad architectures ----------------------------------------------------------------------


def _with(document: dict, path: list, value) -> dict:
    doc = copy.deepcopy(document)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_DELETE = object()

BAD_ARCHITECTURES = [
    (["layers", 0, "type"], "conv3d", r"layer 0: unknown layer type 'conv3d'"),
    (["layers", 0, "activation"], "gelu", r"layer 0 \(conv2d\): 'activation' must be one of"),
    (["layers", 0, "filters"], 0, r"layer 0 \(conv2d\): 'filters' must be >= 1, got 0"),
    (["layers", 0, "filters"], "64", r"'filters' must be an integer >= 1, got '64'"),
    (
        ["layers", 0, "kernel_size"],
        [3],
        r"'kernel_size' must be an integer or a list of 2 integers",
    ),
    (["layers", 0, "kernel_size"], [40, 3], r"shrinks the 28x28 input below 1x1"),
    (["layers", 0, "padding"], "full", r"'padding' must be one of valid, same; got 'full'"),
    (["layers", 0, "filters"], _DELETE, r"'filters' and 'kernel_size' are required"),
    (["layers", 0, "bogus"], 1, r"unknown key\(s\) \['bogus'\]"),
    (["layers", 5, "units"], -3, r"layer 5 \(dense\): 'units' must be >= 1, got -3"),
    (["layers", 4], {"type": "dropout", "rate": 1.5}, r"'rate' must be in \[0, 1\)"),
    (["labels"], ["a", "b"], r"labels: has 2 entries but the model outputs 10 classes"),
    (["input", "shape"], [28, 28], r"input: 'shape' must be \[height, width, channels\]"),
    (["input", "std"], [0.0], r"'std' must be non-zero"),
    (["layers"], [], r"layers: must be a non-empty list"),
]


@pytest.mark.parametrize("path,value,message", BAD_ARCHITECTURES)
def test_bad_architecture_names_the_problem(reference_document, path, value, message):
    with pytest.raises(ModelError, match=message):
        parse_architecture(_with(reference_document, path, value))


def test_dense_on_image_and_missing_flatten_are_explained(reference_document):
    doc = copy.deepcopy(reference_document)
    del doc["layers"][4]  # the flatten
    with pytest.raises(
        ModelError, match=r"layer 4 \(dense\): needs a flat input .* got shape \[5, 5, 64\]"
    ):
        parse_architecture(doc)
    doc = copy.deepcopy(reference_document)
    doc["layers"] = doc["layers"][:4]
    with pytest.raises(ModelError, match=r"the last layer must give a flat output"):
        parse_architecture(doc)


def test_model_error_is_a_value_error():
    assert issubclass(ModelError, ValueError)
    with pytest.raises(ValueError):
        parse_architecture("not a dict")


# -- bad weights ----------------------------------------------------------------------------


def test_bad_weights_are_named(reference_document):
    good = random_weights(reference_document)
    cases = [
        (
            {k: v for k, v in good.items() if k != "layers.2.bias"},
            r"missing tensor\(s\): layers.2.bias \[64\]",
        ),
        (
            {**good, "layers.9.kernel": good["layers.0.bias"]},
            r"unexpected tensor\(s\) \['layers.9.kernel'\]",
        ),
        (
            {**good, "layers.0.kernel": good["layers.0.kernel"].astype(np.float64)},
            r"'layers.0.kernel' has dtype float64, expected float32",
        ),
        (
            {**good, "layers.5.kernel": good["layers.5.kernel"][:10]},
            r"'layers.5.kernel' has shape \[10, 128\], expected \[1600, 128\]",
        ),
    ]
    nan = good["layers.6.bias"].copy()
    nan[3] = np.nan
    cases.append(({**good, "layers.6.bias": nan}, r"'layers.6.bias' contains NaN or Inf"))
    for weights, message in cases:
        with pytest.raises(ModelError, match=message):
            Model(reference_document, weights)


# -- bad files ------------------------------------------------------------------------------


def _file_bytes(tmp_path, model) -> bytes:
    path = tmp_path / "good.safetensors"
    model.save(path)
    return path.read_bytes()


def _header(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _rebuild(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_bad_files_raise_model_error_naming_the_file(tmp_path, reference_model):
    data = _file_bytes(tmp_path, reference_model)
    header, body = _header(data)
    wrong_tag = copy.deepcopy(header)
    wrong_tag["__metadata__"]["format"] = "other/9"
    bad_json = copy.deepcopy(header)
    bad_json["__metadata__"]["architecture"] = "{not json"
    no_arch = copy.deepcopy(header)
    del no_arch["__metadata__"]["architecture"]
    bad_arch = copy.deepcopy(header)
    arch = json.loads(bad_arch["__metadata__"]["architecture"])
    arch["layers"][0]["type"] = "lstm"
    bad_arch["__metadata__"]["architecture"] = json.dumps(arch)
    cases = {
        "empty": (b"", r"not a safetensors file: 0 bytes"),
        "truncated": (data[: len(data) // 2], r"corrupt safetensors data|truncated"),
        "header_cut": (data[:100], r"truncated: header length"),
        "absurd": (struct.pack("<Q", 2**62) + data[8:], r"header length 4611686018427387904 bytes"),
        "not_json": (struct.pack("<Q", 5) + b"hello" + b"\0" * 10, r"header is not valid JSON"),
        "wrong_tag": (
            _rebuild(wrong_tag, body),
            rf"metadata 'format' is 'other/9', expected '{FORMAT}'",
        ),
        "bad_json": (_rebuild(bad_json, body), r"metadata 'architecture' is not valid JSON"),
        "no_arch": (_rebuild(no_arch, body), r"metadata has no 'architecture'"),
        "bad_arch": (_rebuild(bad_arch, body), r"unknown layer type 'lstm'"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ModelError, match=message) as info:
            Model.load(path)
        assert str(path) in str(info.value), name
    with pytest.raises(ModelError, match=r"no such file"):
        Model.load(tmp_path / "missing.safetensors")


def test_random_corruption_never_escapes_as_another_exception(tmp_path, reference_model):
    data = bytearray(_file_bytes(tmp_path, reference_model))
    rng = np.random.default_rng(3)
    header_len = struct.unpack("<Q", bytes(data[:8]))[0]
    for trial in range(40):
        corrupt = bytearray(data)
        for pos in rng.integers(0, 8 + header_len, size=3):
            corrupt[pos] = rng.integers(0, 256)
        path = tmp_path / f"c{trial}.safetensors"
        path.write_bytes(bytes(corrupt))
        try:
            Model.load(path)
        except ModelError:
            pass


# -- bad input to predict / forward ---------------------------------------------------------


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda: np.zeros((2, 28, 28), np.uint8),
            r"expected one image \[28, 28, 1\] or a batch \[N, 28, 28, 1\], got \[2, 28, 28\]",
        ),
        (
            lambda: np.zeros((2, 28, 28, 3), np.uint8),
            r"expected shape \[N, 28, 28, 1\], got \[2, 28, 28, 3\]",
        ),
        (lambda: np.zeros((1, 32, 32, 1), np.uint8), r"got \[1, 32, 32, 1\]"),
        (lambda: np.zeros((0, 28, 28, 1), np.uint8), r"the batch is empty"),
        (
            lambda: np.zeros((1, 28, 28, 1), np.complex64),
            r"dtype is complex64, expected uint8 or a float type",
        ),
        (lambda: np.zeros((1, 28, 28, 1), bool), r"dtype is bool"),
        (lambda: np.full((1, 28, 28, 1), np.nan, np.float32), r"contains NaN or Inf"),
        (lambda: [[1, 2, 3]], r"expected a numpy array, got list"),
    ],
)
def test_bad_predict_input(reference_model, make, message):
    with pytest.raises(ModelError, match=message):
        reference_model.predict(make())


def test_bad_forward_input(reference_model):
    with pytest.raises(ModelError, match=r"dtype is uint8, expected float32"):
        reference_model.forward(np.zeros((1, 28, 28, 1), np.uint8))
    with pytest.raises(ModelError, match=r"got \[1, 28, 28\]"):
        reference_model.forward(np.zeros((1, 28, 28), np.float32))
    with pytest.raises(ModelError, match=r"NaN or Inf"):
        reference_model.forward(np.full((1, 28, 28, 1), np.inf, np.float32))
    with pytest.raises(ModelError, match=r"the batch is empty"):
        reference_model.forward(np.zeros((0, 28, 28, 1), np.float32))
    with pytest.raises(ModelError, match=r"expected a numpy array"):
        reference_model.forward([[0.0] * 28] * 28)


def test_forward_takes_views_that_are_not_contiguous(reference_model):
    """A mirrored or strided view runs as its contiguous copy does, and a NaN in it is found."""
    x = np.random.default_rng(5).random((6, 28, 28, 1), dtype=np.float32)
    for view in (x[:, :, ::-1], x[::2], np.asfortranarray(x)):
        np.testing.assert_array_equal(
            reference_model.forward(view), reference_model.forward(np.ascontiguousarray(view))
        )
    y = x.copy()
    y[3, 4, 27, 0] = np.nan
    with pytest.raises(ModelError, match=r"NaN or Inf"):
        reference_model.forward(y[:, :, ::-1])


def test_a_run_keeps_no_reference_to_its_input_or_result(reference_model):
    """The prepared calls take a run's input and result in and let go of them after: once the
    caller drops them, they are freed (and a replayed program still gives the same results)."""
    import gc
    import weakref

    x = np.random.default_rng(6).random((2, 28, 28, 1), dtype=np.float32)
    first = reference_model.forward(x)
    for preprocess in (False, True):
        batch = x.copy()
        result = reference_model._plan.run(batch, preprocess=preprocess)  # the hot path
        result = reference_model._plan.run(batch, preprocess=preprocess)
        if not preprocess:
            np.testing.assert_array_equal(result, first)
        refs = weakref.ref(batch), weakref.ref(result)
        del batch, result
        gc.collect()
        assert refs[0]() is None and refs[1]() is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_value_anywhere_in_a_batch_is_refused(reference_model, bad):
    x = np.full((3, 28, 28, 1), np.finfo(np.float32).max, np.float32)  # finite, however large
    reference_model.forward(x)
    for where in (0, x.size // 2 + 7, x.size - 1):
        y = x.copy()
        y.flat[where] = bad
        with pytest.raises(ModelError, match=r"NaN or Inf"):
            reference_model.forward(y)
        with pytest.raises(ModelError, match=r"NaN or Inf"):
            reference_model.predict(y)


def test_dropping_llvm_code_pages_lowers_rss_and_keeps_results():
    """After warm-up the server drops LLVM's read-only code pages: the resident set shrinks and
    the model still predicts the same (a fresh process, so earlier tests do not blur RSS)."""
    script = textwrap.dedent("""
        import json, numpy as np
        from convserve.core.model import Model
        from convserve.core.runtime import release_compiler_pages, resident_mb
        m = Model.load(MODEL)
        m.warmup((1, 64))
        x = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1)).astype(np.uint8)
        before_out, before = m.predict(x), resident_mb()
        advised = release_compiler_pages()
        after = resident_mb()
        same = bool((m.predict(x) == before_out).all() and (m.predict(x[:1]) == before_out[:1]).all())
        print(json.dumps({"before": before, "after": after, "advised": advised, "same": same}))
    """).replace("MODEL", repr(str(BUNDLED)))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["same"]
    assert res["advised"] > 10 << 20
    assert res["after"] < res["before"] - 20, res

"""`convserve import` of Keras 3 models (torch backend) saved as .keras and legacy .h5 at test time.

Each imported model is compared with Keras' own output on the same input; the importer itself
reads the files with json and h5py only (checked in a subprocess without keras importable).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from convserve.core.interop import UnsupportedModel
from convserve.core.interop.convert import import_model
from convserve.core.model import Model

os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip("h5py")
pytest.importorskip("torch")
keras = pytest.importorskip("keras")
layers = keras.layers

FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
TOLERANCE = 1e-4


def keras_output(model, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


def save_both(model, folder) -> list:
    paths = [folder / "m.keras", folder / "m.h5"]
    for path in paths:
        model.save(path)
    return paths


def tutorial_model():
    """The seed tutorial's Fashion-MNIST model (plus its 1/255 input scaling and a dropout)."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Rescaling(1 / 255),
            layers.Conv2D(64, 3, activation="relu", name="first_conv"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.2),
            layers.Dense(10, activation="softmax"),
        ]
    )


def test_tutorial_fashion_mnist_model_on_real_images(tmp_path):
    from convserve.core.datasets import read_idx

    keras.utils.set_random_seed(0)
    model = tutorial_model()
    images = read_idx(FASHION)[:64, :, :, None]
    # a few training steps so the weights are not just their initialisation
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32), np.arange(64) % 10, epochs=1, verbose=0)
    expected = keras_output(model, images.astype(np.float32))
    for path in save_both(model, tmp_path):
        out = tmp_path / f"{path.suffix[1:]}.safetensors"
        report = import_model(path, out, labels=[f"class {i}" for i in range(10)])
        assert report.max_diff is not None and report.max_diff <= TOLERANCE
        ours = Model.load(out)
        assert [la.type for la in ours.architecture.layers] == [
            "conv2d", "max_pooling2d", "conv2d", "max_pooling2d", "flatten", "dense", "dense",
        ]  # fmt: skip
        assert ours.architecture.scale == pytest.approx(1 / 255)
        assert np.abs(ours.predict(images) - expected).max() <= TOLERANCE  # uint8 pixels in
        assert (ours.predict(images).argmax(1) == expected.argmax(1)).all()


def chain_model():
    """A single-chain Functional model: Normalization, bias-less strided conv + BatchNorm + ReLU,
    'same' average pooling, tanh conv, global pooling, Dense + Activation, Softmax layer."""
    inputs = keras.Input((17, 17, 3))
    x = layers.Normalization(mean=[0.5, 0.4, 0.3], variance=[0.04, 0.05, 0.06])(inputs)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="down")(x)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    x = layers.AveragePooling2D(3, strides=2, padding="same")(x)
    x = layers.Conv2D(6, (3, 2), padding="same", activation="tanh")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(5)(x)
    x = layers.Activation("sigmoid")(x)
    x = layers.Dense(4)(x)
    outputs = layers.Softmax()(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    model.get_layer("bn").set_weights(
        [
            rng.uniform(0.5, 1.5, 8),
            rng.uniform(-0.5, 0.5, 8),
            rng.uniform(-1, 1, 8),
            rng.uniform(0.5, 2, 8),
        ]
    )
    return model


def test_functional_chain_with_batchnorm_and_normalization(tmp_path):
    keras.utils.set_random_seed(1)
    model = chain_model()
    x = np.random.default_rng(2).uniform(0, 1, (4, 17, 17, 3)).astype(np.float32)
    expected = keras_output(model, x)
    for path in save_both(model, tmp_path):
        out = tmp_path / f"{path.suffix[1:]}.safetensors"
        import_model(path, out, name="chain")
        ours = Model.load(out)
        assert ours.name == "chain"
        assert ours.architecture.layers[0].use_bias  # the folded BatchNorm gives the conv a bias
        assert np.abs(ours.predict(x) - expected).max() <= TOLERANCE


def test_importing_needs_no_keras(tmp_path):
    keras.utils.set_random_seed(3)
    path = save_both(tutorial_model(), tmp_path)[0]
    code = (
        "import sys; sys.modules['keras'] = None; "
        "from convserve.core.interop.convert import import_model; "
        f"r = import_model({str(path)!r}, {str(tmp_path / 'k.safetensors')!r}); print(r.runtime)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize(
    "layer,fragments",
    [
        (
            lambda: layers.Conv2D(4, 3, dilation_rate=2, name="dil"),
            ["'dil' (Conv2D)", "dilation_rate"],
        ),
        (lambda: layers.Conv2D(4, 3, groups=2, name="grp"), ["'grp' (Conv2D)", "groups=2"]),
        (
            lambda: layers.Conv2D(4, 3, activation="gelu", name="g"),
            ["'g' (Conv2D)", "activation 'gelu'"],
        ),
        (lambda: layers.ReLU(max_value=6.0, name="r6"), ["'r6' (ReLU)", "max_value=6.0"]),
        (lambda: layers.Reshape((36, 4), name="rs"), ["'rs' (Reshape)", "unsupported layer"]),
    ],
)
def test_unsupported_layers_are_refused_by_name(tmp_path, layer, fragments):
    model = keras.Sequential([keras.Input((6, 6, 4)), layer(), layers.Flatten(), layers.Dense(2)])
    for path in save_both(model, tmp_path):
        with pytest.raises(UnsupportedModel) as caught:
            import_model(path, tmp_path / "x.safetensors")
        message = str(caught.value)
        assert message.startswith("Keras layer '") and "\n" not in message
        for fragment in fragments:
            assert fragment in message, message
    assert not (tmp_path / "x.safetensors").exists()


def test_lstm_and_residual_models_are_refused(tmp_path):
    seq = keras.Sequential(
        [keras.Input((5, 6, 1)), layers.Reshape((5, 6)), layers.LSTM(3, name="rnn")]
    )
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(2, 3, padding="same")(inputs)
    x = layers.Add(name="skip")([x, inputs])
    residual = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)))
    for model, fragment in ((seq, "(Reshape): unsupported layer"), (residual, "'skip' (Add)")):
        path = tmp_path / "m.keras"
        model.save(path)
        with pytest.raises(UnsupportedModel, match=r"^Keras layer .*") as caught:
            import_model(path, tmp_path / "x.safetensors")
        assert fragment in str(caught.value)


def test_broken_keras_files_are_one_line_errors(tmp_path):
    import zipfile

    keras.utils.set_random_seed(4)
    path = save_both(tutorial_model(), tmp_path)[0]
    data = path.read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "noweights.keras", "w") as dst:
        for name in ("config.json", "metadata.json"):
            dst.writestr(name, src.read(name))
    for name in ("cut.keras", "noweights.keras"):
        with pytest.raises(UnsupportedModel) as caught:
            import_model(tmp_path / name, tmp_path / "x.safetensors")
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_batchnorm_variants_fold_and_become_preprocessing(tmp_path):
    """BatchNormalization first (preprocessing), after a bias-less conv without beta, and after
    a dense without gamma: the .keras file numbers only the variables that exist."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            layers.BatchNormalization(),
            layers.Conv2D(3, 3, use_bias=False),
            layers.BatchNormalization(center=False),
            layers.Activation("relu"),
            layers.Flatten(),
            layers.Dense(4),
            layers.BatchNormalization(scale=False, epsilon=0.01),
            layers.Softmax(),
        ]
    )
    rng = np.random.default_rng(3)
    for item in model.layers:
        if isinstance(item, layers.BatchNormalization):
            item.set_weights([rng.uniform(0.5, 1.5, w.shape) for w in item.get_weights()])
    x = rng.standard_normal((3, 8, 8, 2)).astype(np.float32)
    expected = keras_output(model, x)
    for path in save_both(model, tmp_path):
        out = tmp_path / f"{path.suffix[1:]}.safetensors"
        import_model(path, out)
        ours = Model.load(out)
        assert [la.type for la in ours.architecture.layers] == ["conv2d", "flatten", "dense"]
        assert any(v != 1.0 for v in ours.architecture.std)  # the first BatchNormalization
        assert np.abs(ours.predict(x) - expected).max() <= TOLERANCE

"""Training from an image folder made at test time: real Fashion-MNIST images written as PNG
files into one folder per class, plus a broken file; labels, splits, skipped files, the cache."""

from __future__ import annotations

import numpy as np
import pytest
from convserve.core import Model
from convserve.core.datasets import DataError, load_dataset
from convserve.core.imagefolder import load_image_folder
from convserve.core.presets import FASHION_MNIST_LABELS
from convserve.core.training.trainer import fit
from PIL import Image

from convserve.cli import main
from tests.test_trainer import TINY

# folder names that sort in a different order than the dataset's class numbers
FOLDERS = [name.replace("/", "-") for name in FASHION_MNIST_LABELS]


def write_folder(root, images, labels, *, rgb=False, scale=1):
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / FOLDERS[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image[..., 0])
        if rgb:
            picture = picture.convert("RGB")
        if scale != 1:
            picture = picture.resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)
        suffix = ".jpg" if index % 7 == 0 and not rgb else ".png"
        picture.save(folder / f"{index:05d}{suffix}", quality=95)


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def split_folder(fashion, tmp_path):
    root = tmp_path / "clothes"
    write_folder(root / "train", fashion.x_train[:600], fashion.y_train[:600])
    write_folder(root / "test", fashion.x_test[:200], fashion.y_test[:200])
    (root / "train" / FOLDERS[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "train" / FOLDERS[0] / "notes.txt").write_text("not an image, ignored")
    return root


def test_trains_from_an_image_folder_with_labels_from_the_folders(split_folder, fashion, tmp_path):
    out = tmp_path / "model.safetensors"
    lines: list[str] = []
    result = fit(
        str(split_folder), TINY, out, progress=False, log=lines.append,
        epochs=4, batch_size=32, lr=1e-2, seed=3,
    )  # fmt: skip
    model = Model.load(out)
    assert model.labels == sorted(FOLDERS)
    assert any("broken.png" in line for line in lines)
    assert any("skipped 1 unreadable file(s)" in line for line in lines)
    # the folder's test split was the validation set; check it on the original arrays
    by_folder = np.array([sorted(FOLDERS).index(FOLDERS[y]) for y in fashion.y_test[:200]])
    predicted = model.predict(fashion.x_test[:200]).argmax(axis=1)
    accuracy = float(np.mean(predicted == by_folder))
    assert accuracy > 0.55, accuracy  # chance is 0.10
    assert abs(accuracy - result.history[-1]["val_accuracy"]) <= 0.03  # JPEG files differ a bit


def test_decoded_arrays_match_the_pixels_and_the_cache_follows_the_files(split_folder, fashion):
    lines: list[str] = []
    first = load_image_folder(split_folder, (28, 28, 1), log=lines.append)
    assert first.class_names == sorted(FOLDERS)
    assert len(first.x_train) == 600 and len(first.x_test) == 200 and first.x_val is None
    # PNG files decode to the exact pixels: find image 1 (a PNG) among its class's files
    label = sorted(FOLDERS).index(FOLDERS[fashion.y_train[1]])
    same_class = first.x_train[first.y_train == label]
    assert any(np.array_equal(x, fashion.x_train[1]) for x in same_class)
    again: list[str] = []
    second = load_image_folder(split_folder, (28, 28, 1), log=again.append)
    assert any("from the cache" in line for line in again)
    assert np.array_equal(first.x_train, second.x_train)
    # a new file invalidates the cache
    Image.fromarray(fashion.x_train[0][..., 0]).save(
        split_folder / "train" / FOLDERS[1] / "new.png"
    )
    third_log: list[str] = []
    third = load_image_folder(split_folder, (28, 28, 1), log=third_log.append)
    assert len(third.x_train) == 601
    assert not any("from the cache" in line for line in third_log)


def test_rgb_and_larger_images_are_converted_and_resized(fashion, tmp_path):
    root = tmp_path / "flat"
    write_folder(root, fashion.x_train[:40], fashion.y_train[:40], rgb=True, scale=2)
    gray = load_image_folder(root, (28, 28, 1), log=lambda line: None)
    assert gray.x_train.shape == (40, 28, 28, 1) and gray.x_test is None
    color = load_image_folder(root, (32, 32, 3), log=lambda line: None)
    assert color.x_train.shape == (40, 32, 32, 3)
    # grey pictures stay grey in RGB: the three channels are equal
    assert np.array_equal(color.x_train[..., 0], color.x_train[..., 2])
    # a 2x nearest upscale resized back by bilinear is close to the original
    label = sorted(FOLDERS).index(FOLDERS[fashion.y_train[0]])
    first = gray.x_train[gray.y_train == label][0].astype(int)
    assert np.abs(first - fashion.x_train[0].astype(int)).mean() < 20


def test_command_line_train_on_a_flat_folder_uses_the_validation_split(fashion, tmp_path, capsys):
    root = tmp_path / "flat"
    write_folder(root, fashion.x_train[:300], fashion.y_train[:300])
    out = tmp_path / "m.safetensors"
    arch = tmp_path / "tiny.json"
    import json

    arch.write_text(json.dumps(TINY))
    code = main(
        ["train", "--data", str(root), "--architecture", str(arch), "--out", str(out),
         "--epochs", "1", "--validation-split", "0.2", "--quiet", "--no-plot"]
    )  # fmt: skip
    assert code == 0
    assert "val_accuracy" in capsys.readouterr().out
    assert Model.load(out).labels == sorted(FOLDERS)


def test_errors_are_one_line_and_name_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "x.txt").write_text("no images")
    with pytest.raises(DataError, match="no IDX files"):
        load_dataset(empty, (28, 28, 1))
    odd = tmp_path / "odd"
    (odd / "train" / "cat").mkdir(parents=True)
    (odd / "test" / "dog").mkdir(parents=True)
    Image.new("L", (8, 8)).save(odd / "train" / "cat" / "1.png")
    Image.new("L", (8, 8)).save(odd / "test" / "dog" / "1.png")
    with pytest.raises(DataError, match=r"\['dog'\] are not in the training classes"):
        load_dataset(odd, (28, 28, 1))
    with pytest.raises(DataError, match="1 \\(grayscale\\) or 3 \\(RGB\\)"):
        load_dataset(odd, (28, 28, 2))


def test_resume_with_the_architecture_given_and_a_damaged_cache(fashion, tmp_path):
    root = tmp_path / "flat"
    write_folder(root, fashion.x_train[:200], fashion.y_train[:200])
    quiet = dict(progress=False, log=lambda line: None)
    settings = dict(batch_size=32, lr=1e-2, seed=2, validation_split=0.25)
    straight = fit(str(root), TINY, tmp_path / "a.safetensors", **quiet, epochs=2, **settings)
    for entry in (tmp_path / "cache").rglob("*.npz"):
        entry.write_bytes(b"PK\x03\x04 damaged")  # a broken cache entry is decoded again
    first = fit(str(root), TINY, tmp_path / "b.safetensors", **quiet, epochs=1, **settings)
    resumed = fit(str(root), TINY, tmp_path / "b.safetensors", resume=first.checkpoint,
                  **quiet, epochs=2)  # fmt: skip
    for name, value in straight.model.weights.items():
        assert np.array_equal(value, resumed.model.weights[name]), name

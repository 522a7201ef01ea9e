"""Dataset loading: real Fashion-MNIST, and small synthetic (good and bad) IDX, CIFAR-10 and .npz files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from convserve.core.datasets import (
    DataError,
    check_against,
    load_dataset,
    read_idx,
    split_validation,
)

from convserve.cli import main


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_dir(
    directory: Path, n_train=12, n_test=5, gz=True, rows=28, cols=28
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, n_train, dtype=np.uint8)
    files = {
        "train-images-idx3-ubyte": images,
        "train-labels-idx1-ubyte": labels,
        "t10k-images-idx3-ubyte": images[:n_test],
        "t10k-labels-idx1-ubyte": labels[:n_test],
    }
    for name, array in files.items():
        data = _idx_bytes(array)
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return images, labels


# ----------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


def test_real_fashion_mnist(fashion):
    assert fashion.x_train.shape == (60000, 28, 28, 1) and fashion.x_train.dtype == np.uint8
    assert fashion.x_test.shape == (10000, 28, 28, 1)
    assert np.array_equal(np.bincount(fashion.y_train), [6000] * 10)
    assert np.array_equal(np.bincount(fashion.y_test), [1000] * 10)
    assert fashion.x_train.max() == 255 and fashion.x_train.min() == 0
    check_against(fashion, (28, 28, 1), 10)  # no error


def test_real_data_against_wrong_architecture(fashion):
    with pytest.raises(
        DataError, match=r"images have shape \[28, 28, 1\], the architecture expects \[32, 32, 3\]"
    ):
        check_against(fashion, (32, 32, 3), 10)
    with pytest.raises(DataError, match="label 9 is outside the model's classes 0-4"):
        check_against(fashion, (28, 28, 1), 5)


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trip(tmp_path, gz):
    images, labels = _write_idx_dir(tmp_path / "d", gz=gz)
    data = load_dataset(tmp_path / "d")
    assert np.array_equal(data.x_train[..., 0], images)
    assert np.array_equal(data.y_train, labels)
    assert data.x_test.shape == (5, 28, 28, 1)


def test_idx_without_test_files(tmp_path):
    _write_idx_dir(tmp_path, gz=False)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).unlink()
    data = load_dataset(tmp_path)
    assert data.x_test is None and len(data.x_train) == 12


def test_idx_wrong_magic(tmp_path):
    _write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: wrong magic number 0x1234"):
        load_dataset(tmp_path)


def test_idx_counts_differ(tmp_path):
    _write_idx_dir(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte holds 12 images but .*train-labels-idx1-ubyte holds 11 labels",
    ):
        load_dataset(tmp_path)


def test_idx_truncated(tmp_path):
    _write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte: IDX dimensions \[12, 28, 28\] need 9408 bytes"
    ):
        read_idx(path)


def test_idx_empty_dataset(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(0, np.uint8)))
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path)


def test_idx_bad_gzip_and_missing_labels(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
        load_dataset(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot read"):
        load_dataset(tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10
def _cifar_file(path: Path, labels: list[int]) -> np.ndarray:
    rng = np.random.default_rng(len(labels))
    pixels = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    records = np.concatenate(
        [np.array(labels, np.uint8)[:, None], pixels.reshape(len(labels), -1)], axis=1
    )
    path.write_bytes(records.tobytes())
    return pixels


def test_cifar10_directory(tmp_path):
    p1 = _cifar_file(tmp_path / "data_batch_1.bin", [0, 1, 2])
    _cifar_file(tmp_path / "data_batch_2.bin", [3, 9])
    _cifar_file(tmp_path / "test_batch.bin", [5, 6, 7, 8])
    data = load_dataset(tmp_path)
    assert data.x_train.shape == (5, 32, 32, 3) and data.x_test.shape == (4, 32, 32, 3)
    assert list(data.y_train) == [0, 1, 2, 3, 9]
    # CIFAR stores the red plane first: channel 0 of NHWC is that plane
    assert np.array_equal(data.x_train[1, :, :, 0], p1[1, 0])
    assert np.array_equal(data.x_train[1, :, :, 2], p1[1, 2])


def test_cifar10_bad_size_and_labels(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(3073 * 2 + 5))
    with pytest.raises(
        DataError,
        match=r"data_batch_1.bin: size 6151 bytes is not a multiple of the CIFAR-10 record size 3073",
    ):
        load_dataset(tmp_path)
    _cifar_file(tmp_path / "data_batch_1.bin", [1, 12])
    with pytest.raises(DataError, match="label 12 outside CIFAR-10's classes"):
        load_dataset(tmp_path)


# ----------------------------------------------------------------------------- npz
def test_npz_nhw_uint8_and_float_nhwc(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 8)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3].reshape(3, 1))
    data = load_dataset(tmp_path / "a.npz")
    assert data.x_train.shape == (8, 28, 28, 1) and data.x_train.dtype == np.uint8
    assert list(data.y_test) == list(y[:3])
    xf = rng.random((4, 32, 32, 3), dtype=np.float32)
    np.savez_compressed(tmp_path / "b.npz", x_train=xf, y_train=np.arange(4))
    data = load_dataset(tmp_path / "b.npz")
    assert data.x_train.dtype == np.float32 and data.x_test is None


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "missing.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"missing.npz: missing array\(s\) \['y_train'\]"):
        load_dataset(tmp_path / "missing.npz")
    np.savez(
        tmp_path / "pickled.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1)
    )
    with pytest.raises(DataError, match="pickled.npz"):
        load_dataset(tmp_path / "pickled.npz")
    np.savez(
        tmp_path / "counts.npz",
        x_train=np.zeros((3, 4, 4), np.uint8),
        y_train=np.zeros(2, np.int64),
    )
    with pytest.raises(DataError, match="holds 3 images but 'y_train' holds 2 labels"):
        load_dataset(tmp_path / "counts.npz")
    np.savez(
        tmp_path / "frac.npz", x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.array([0.5, 1.0])
    )
    with pytest.raises(DataError, match="expected integer class labels"):
        load_dataset(tmp_path / "frac.npz")
    np.savez(
        tmp_path / "empty.npz", x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.zeros(0, np.int64)
    )
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path / "empty.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match="junk.npz: not a readable .npz"):
        load_dataset(tmp_path / "junk.npz")


def test_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no IDX files"):
        load_dataset(tmp_path)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported dataset"):
        load_dataset(tmp_path / "x.csv")


# ----------------------------------------------------------------------------- validation split
def test_validation_split_is_seeded_and_disjoint():
    x = np.arange(100).reshape(100, 1, 1, 1)
    y = np.arange(100)
    xt, yt, xv, yv = split_validation(x, y, 0.2, seed=3)
    assert len(xv) == 20 and len(xt) == 80
    assert set(yt).isdisjoint(yv) and set(yt) | set(yv) == set(range(100))
    assert np.array_equal(split_validation(x, y, 0.2, seed=3)[3], yv)
    assert not np.array_equal(split_validation(x, y, 0.2, seed=4)[3], yv)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_validation(x, y, 1.5, seed=0)


# ----------------------------------------------------------------------------- command line
def test_cli_reports_bad_data_without_traceback(tmp_path, capsys):
    _write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + path.read_bytes()[4:])
    code = main(
        [
            "train",
            "--data",
            str(tmp_path),
            "--architecture",
            "fashion_mnist",
            "--out",
            str(tmp_path / "m.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert (
        err.startswith("convserve train: ") and "train-labels-idx1-ubyte" in err and "0x0d" in err
    )
    assert "Traceback" not in err


def test_cli_labels_outside_classes(tmp_path, capsys):
    x = np.zeros((4, 28, 28), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1, 2, 10]))
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "d.npz"),
            "--architecture",
            "fashion_mnist",
            "--out",
            str(tmp_path / "m.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "label 10 is outside the model's classes 0-9" in err
    assert not (tmp_path / "m.safetensors").exists()

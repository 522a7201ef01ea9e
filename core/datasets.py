"""Image classification datasets for the trainer: IDX (MNIST/Fashion-MNIST), CIFAR-10 binary, .npz.

`load_dataset(spec)` accepts `fashion-mnist` (Debian's dataset-fashion-mnist), a directory of
IDX files, a CIFAR-10 binary directory, a Keras-layout `.npz`, or an image folder (one subfolder
per class, see `imagefolder.py`; it needs the input shape to decode to). Images come back as NHWC
(uint8 when the source is uint8) and labels as int64. Every problem raises `DataError` naming
the file and what is wrong.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASET_ALIASES = {"fashion-mnist": FASHION_MNIST_DIR, "fashion_mnist": FASHION_MNIST_DIR}

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR_TEST = "test_batch.bin"
CIFAR_RECORD = 1 + 32 * 32 * 3


class DataError(ValueError):
    """A dataset that cannot be used: the message names the file and the problem."""


@dataclass
class Dataset:
    """Training images and labels, with optional test and validation splits. Images are NHWC.

    `class_names` is set when the data names its classes (image folders: the folder names)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    source: str = ""
    class_names: list[str] | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


# ------------------------------------------------------------------------------------- IDX
def _open_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) holding unsigned bytes."""
    path = Path(path)
    data = _open_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX file ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{path}: wrong magic number 0x{data[:4].hex()}, expected 0x000008NN (IDX unsigned byte)"
        )
    if data[2] != 0x08:
        raise DataError(
            f"{path}: IDX element type 0x{data[2]:02x} is not supported, expected 0x08 (unsigned byte)"
        )
    ndim = data[3]
    if ndim not in (1, 3):
        raise DataError(
            f"{path}: IDX file has {ndim} dimensions, expected 1 (labels) or 3 (images)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX dimensions {list(dims)} need {expected} bytes of data, the file has {len(data) - header}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (directory / name).is_file():
            return directory / name
    return None


def _check_pair(x: np.ndarray, y: np.ndarray, images: str, labels: str) -> None:
    if len(x) != len(y):
        raise DataError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{images}: the dataset is empty (0 images)")


def load_idx_dir(directory: str | os.PathLike) -> Dataset:
    """train-images-idx3-ubyte[.gz] and friends; the t10k test files are optional."""
    directory = Path(directory)
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (img_stem, lab_stem) in IDX_FILES.items():
        img_path, lab_path = _find(directory, img_stem), _find(directory, lab_stem)
        if img_path is None and lab_path is None and split == "test":
            continue
        if img_path is None or lab_path is None:
            missing = img_stem if img_path is None else lab_stem
            raise DataError(f"{directory}: missing {missing}[.gz]")
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3:
            raise DataError(
                f"{img_path}: expected 3 dimensions (count, rows, cols), got {images.ndim}"
            )
        if labels.ndim != 1:
            raise DataError(f"{lab_path}: expected 1 dimension (count), got {labels.ndim}")
        _check_pair(images, labels, str(img_path), str(lab_path))
        splits[split] = (images[..., None], labels.astype(np.int64))
    x_test, y_test = splits.get("test", (None, None))
    return Dataset(*splits["train"], x_test, y_test, source=str(directory))


# ------------------------------------------------------------------------------------- CIFAR-10
def _read_cifar(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = _open_bytes(path)
    if len(data) == 0:
        raise DataError(f"{path}: the file is empty")
    if len(data) % CIFAR_RECORD:
        raise DataError(
            f"{path}: size {len(data)} bytes is not a multiple of the CIFAR-10 record size {CIFAR_RECORD} (1 label + 3072 pixels)"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label {labels.max()} outside CIFAR-10's classes 0-9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar10_dir(directory: str | os.PathLike) -> Dataset:
    """data_batch_1.bin ... data_batch_5.bin (those present) and test_batch.bin (optional)."""
    directory = Path(directory)
    parts = [_read_cifar(directory / name) for name in CIFAR_TRAIN if (directory / name).is_file()]
    if not parts:
        raise DataError(f"{directory}: no CIFAR-10 data_batch_N.bin files")
    x_test = y_test = None
    if (directory / CIFAR_TEST).is_file():
        x_test, y_test = _read_cifar(directory / CIFAR_TEST)
    return Dataset(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        x_test,
        y_test,
        source=str(directory),
    )


# ------------------------------------------------------------------------------------- npz
def _npz_images(path: Path, key: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 3:
        value = value[..., None]
    if value.ndim != 4:
        raise DataError(
            f"{path}: '{key}' has shape {list(value.shape)}, expected images (N, H, W) or (N, H, W, C)"
        )
    if value.dtype != np.uint8 and value.dtype.kind not in "fiu":
        raise DataError(f"{path}: '{key}' has dtype {value.dtype}, expected uint8 or float")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise DataError(f"{path}: '{key}' contains NaN or Inf")
    if value.dtype.kind in "iu" and value.dtype != np.uint8:
        value = value.astype(np.float32)
    return np.ascontiguousarray(value)


def _npz_labels(path: Path, key: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim != 1:
        raise DataError(
            f"{path}: '{key}' has shape {list(value.shape)}, expected integer labels (N,)"
        )
    if value.dtype.kind not in "iu":
        if value.dtype.kind == "f" and np.all(value == np.round(value)):
            value = value.astype(np.int64)
        else:
            raise DataError(
                f"{path}: '{key}' has dtype {value.dtype}, expected integer class labels"
            )
    return value.astype(np.int64)


def load_npz(path: str | os.PathLike) -> Dataset:
    """Keras datasets layout: x_train, y_train and optionally x_test, y_test (no pickle)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(
            f"{path}: not a readable .npz file (or it holds pickled objects): {exc}"
        ) from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing}; found {sorted(arrays)}")
    x_train = _npz_images(path, "x_train", arrays["x_train"])
    y_train = _npz_labels(path, "y_train", arrays["y_train"])
    _check_pair(x_train, y_train, f"{path} 'x_train'", "'y_train'")
    x_test = y_test = None
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: 'x_test' and 'y_test' must come together; found {sorted(arrays)}")
    if "x_test" in arrays:
        x_test = _npz_images(path, "x_test", arrays["x_test"])
        y_test = _npz_labels(path, "y_test", arrays["y_test"])
        _check_pair(x_test, y_test, f"{path} 'x_test'", "'y_test'")
    return Dataset(x_train, y_train, x_test, y_test, source=str(path))


# ------------------------------------------------------------------------------------- entry
def load_dataset(
    spec: str | os.PathLike,
    image_shape: tuple[int, int, int] | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Dataset:
    """Load `fashion-mnist`, an IDX directory, a CIFAR-10 binary directory, an .npz file or an
    image folder. Image folders are decoded to `image_shape` (H, W, C), which they require;
    `progress` shows a bar while decoding and `log` receives the skipped-file report."""
    name = str(spec)
    if name in DATASET_ALIASES:
        directory = DATASET_ALIASES[name]
        if not directory.is_dir():
            raise DataError(
                f"{name}: {directory} not found; install Debian's dataset-fashion-mnist package"
            )
        return load_idx_dir(directory)
    path = Path(name)
    if path.is_dir():
        if _find(path, IDX_FILES["train"][0]) or _find(path, IDX_FILES["train"][1]):
            return load_idx_dir(path)
        if any((path / n).is_file() for n in CIFAR_TRAIN):
            return load_cifar10_dir(path)
        from convserve.core.imagefolder import load_image_folder, looks_like_image_folder

        if looks_like_image_folder(path):
            if image_shape is None:
                raise DataError(f"{path}: an image folder needs the input shape to decode to")
            return load_image_folder(path, image_shape, progress=progress, log=log)
        raise DataError(
            f"{path}: no IDX files (train-images-idx3-ubyte[.gz]), CIFAR-10 files (data_batch_1.bin) "
            "or class subfolders of PNG/JPEG images found"
        )
    if path.suffix == ".npz":
        return load_npz(path)
    if not path.exists():
        raise DataError(
            f"{path}: no such file or directory (expected fashion-mnist, a directory or an .npz file)"
        )
    raise DataError(
        f"{path}: unsupported dataset; expected an IDX or CIFAR-10 directory, or an .npz file"
    )


def check_against(dataset: Dataset, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Raise DataError if images do not fit the architecture or labels fall outside its classes."""
    for split, x, y in (
        ("train", dataset.x_train, dataset.y_train),
        ("test", dataset.x_test, dataset.y_test),
        ("validation", dataset.x_val, dataset.y_val),
    ):
        if x is None:
            continue
        if len(x) == 0:
            raise DataError(f"{dataset.source}: the {split} set is empty")
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise DataError(
                f"{dataset.source}: {split} images have shape {list(x.shape[1:])}, "
                f"the architecture expects {list(input_shape)}"
            )
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise DataError(
                f"{dataset.source}: {split} label {bad} is outside the model's classes 0-{num_classes - 1}"
            )


def split_validation(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, ...]:
    """Hold out a seeded random `fraction` for validation: (x_train, y_train, x_val, y_val)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation split must be between 0 and 1 (exclusive), got {fraction}")
    count = int(round(len(x) * fraction))
    if count < 1 or count >= len(x):
        raise DataError(
            f"validation split {fraction} of {len(x)} images leaves an empty training or validation set"
        )
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(x))
    val, train = np.sort(order[:count]), np.sort(order[count:])
    return x[train], y[train], x[val], y[val]

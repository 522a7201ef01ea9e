"""Write a handful of real Fashion-MNIST test images to PNG files in this folder.

One image per class (the first test image of each class, in order of appearance, until
COUNT are chosen), plus one RGB image of a different size that shows the client's conversion
(grayscale and resize to the model's 28x28x1). Run from anywhere:

    python examples/make_examples.py [--source /usr/share/datasets/fashion-mnist] [--count 8]

It rewrites the PNG files and `examples/labels.csv` (file, test index, class index, label).
"""

from __future__ import annotations

import argparse
import csv
import gzip
from pathlib import Path

import numpy as np
from convserve.core.presets import FASHION_MNIST_LABELS
from PIL import Image

HERE = Path(__file__).resolve().parent


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte elements
        raise ValueError(f"{path}: expected an IDX file of unsigned bytes, got magic 0x{magic:08x}")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def slug(label: str) -> str:
    return label.lower().replace("/", "_").replace("-", "_").replace(" ", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()

    images = read_idx(args.source / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "t10k-labels-idx1-ubyte.gz")
    chosen: dict[int, int] = {}  # class -> first test index
    for index, label in enumerate(labels):
        if len(chosen) == args.count:
            break
        chosen.setdefault(int(label), index)

    rows = []
    for label, index in chosen.items():
        name = f"{slug(FASHION_MNIST_LABELS[label])}_{index}.png"
        Image.fromarray(images[index], mode="L").save(HERE / name, optimize=True)
        rows.append((name, index, label, FASHION_MNIST_LABELS[label]))

    # An RGB image of another size: the first test image, upscaled to 56x56 and tinted.
    index = 0
    label = int(labels[index])
    gray = Image.fromarray(images[index], mode="L").resize((56, 56), Image.Resampling.BILINEAR)
    rgb = np.stack([np.asarray(gray)] * 3, axis=-1).astype(np.float32) * np.array([1.0, 0.85, 0.7])
    name = f"rgb_56x56_{slug(FASHION_MNIST_LABELS[label])}_{index}.png"
    Image.fromarray(rgb.round().astype(np.uint8), mode="RGB").save(HERE / name, optimize=True)
    rows.append((name, index, label, FASHION_MNIST_LABELS[label]))

    with open(HERE / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "test_index", "class_index", "label"])
        writer.writerows(rows)
    for row in rows:
        print(*row, sep="\t")


if __name__ == "__main__":
    main()

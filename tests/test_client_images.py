"""Client image preparation: arrays, PNG bytes and paths, channel conversion, resizing, bad input."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from convserve.client.images import decode, prepare
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MNIST = (28, 28, 1)


def _examples() -> list[dict]:
    with open(EXAMPLES / "labels.csv") as f:
        return list(csv.DictReader(f))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _test_images() -> np.ndarray:
    import gzip

    with gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz") as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)


def test_example_pngs_are_the_real_test_images():
    images = _test_images()
    rows = [r for r in _examples() if not r["file"].startswith("rgb_")]
    assert len(rows) >= 8 and len({r["class_index"] for r in rows}) == len(rows)  # one per class
    for row in rows:
        decoded = decode(EXAMPLES / row["file"])
        assert decoded.shape == (28, 28, 1) and decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded[:, :, 0], images[int(row["test_index"])])


def test_paths_bytes_and_arrays_give_the_same_batch():
    path = EXAMPLES / "sneaker_9.png"
    pixels = np.asarray(Image.open(path))
    from_path = prepare(str(path), MNIST)
    from_pathlike = prepare(path, MNIST)
    from_bytes = prepare(path.read_bytes(), MNIST)
    from_hw = prepare(pixels, MNIST)
    from_hwc = prepare(pixels[:, :, None], MNIST)
    for batch in (from_path, from_pathlike, from_bytes, from_hw, from_hwc):
        assert (
            batch.shape == (1, 28, 28, 1) and batch.dtype == np.uint8 and batch.flags.c_contiguous
        )
        np.testing.assert_array_equal(batch[0, :, :, 0], pixels)


def test_mixed_lists_and_batches_keep_order():
    images = _test_images()[:5]
    batch = prepare([images[0], _png(images[1]), images[2:5]], MNIST)
    assert batch.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(batch[:, :, :, 0], images)
    nhw = prepare(images, MNIST)  # (N, H, W) grayscale batch
    np.testing.assert_array_equal(nhw[:, :, :, 0], images)
    nhwc = prepare(images[:, :, :, None], MNIST)
    np.testing.assert_array_equal(nhwc, nhw)


def test_rgb_is_converted_to_grayscale_with_pillow_luma():
    rgb = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    from_array = prepare(rgb, MNIST)[0, :, :, 0]
    from_png = prepare(_png(rgb), MNIST)[0, :, :, 0]
    np.testing.assert_array_equal(from_png, expected)
    # NumPy's luma rounds like Pillow's fixed-point one up to one grey level.
    assert np.abs(from_array.astype(int) - expected.astype(int)).max() <= 1
    rgba = np.concatenate([rgb, np.full((28, 28, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(prepare(rgba, MNIST), prepare(rgb, MNIST))


def test_grayscale_is_repeated_for_rgb_models():
    gray = _test_images()[0]
    batch = prepare(gray, (28, 28, 3))
    assert batch.shape == (1, 28, 28, 3)
    for c in range(3):
        np.testing.assert_array_equal(batch[0, :, :, c], gray)
    png = prepare(EXAMPLES / "ankle_boot_0.png", (28, 28, 3))
    np.testing.assert_array_equal(png, batch)


def test_resize_to_the_model_size():
    example = EXAMPLES / "rgb_56x56_ankle_boot_0.png"
    batch = prepare(example, MNIST)
    assert batch.shape == (1, 28, 28, 1)
    expected = np.asarray(
        Image.open(example).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    )
    np.testing.assert_array_equal(batch[0, :, :, 0], expected)
    # The upscaled, tinted copy still looks like the original test image.
    original = _test_images()[0].astype(float)
    assert np.corrcoef(batch[0, :, :, 0].ravel().astype(float), original.ravel())[0, 1] > 0.9
    # Arrays of another size are resized too, uint8 and float alike.
    big = np.asarray(Image.open(example))
    assert prepare(big, MNIST).shape == (1, 28, 28, 1)
    as_float = prepare(big.astype(np.float32), MNIST, np.float32)
    assert as_float.shape == (1, 28, 28, 1) and as_float.dtype == np.float32
    assert np.abs(as_float - prepare(big, MNIST).astype(np.float32)).max() <= 2.0
    # Variable sizes (None) are left alone.
    assert prepare(big, (None, None, 1)).shape == (1, 56, 56, 1)


def test_dtypes():
    gray = _test_images()[0]
    as_float = prepare(gray, MNIST, np.float32)
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(as_float[0, :, :, 0], gray.astype(np.float32))
    # Whole float pixels convert to a UINT8 model; fractional ones are refused, not rounded silently.
    np.testing.assert_array_equal(prepare(gray.astype(np.float64), MNIST), prepare(gray, MNIST))
    with pytest.raises(ValueError, match="UINT8 pixels 0..255"):
        prepare(gray / 255.0, MNIST)
    with pytest.raises(ValueError, match="0..255"):
        prepare(gray.astype(np.int32) * 4, MNIST, np.float32)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (b"not an image", ValueError, "not a readable image"),
        ("/nonexistent/image.png", FileNotFoundError, "no such image file"),
        (np.zeros((2, 2, 2, 2, 2), np.uint8), ValueError, r"shape \(2, 2, 2, 2, 2\)"),
        (np.zeros((28, 28, 5), np.uint8), ValueError, "5 channels"),
        (np.zeros((28, 28), dtype=object), TypeError, "dtype object"),
        (np.zeros((28, 28), dtype=bool), TypeError, "dtype bool"),
        ([], ValueError, "empty"),
        (42, TypeError, "got int"),
        ([np.zeros((28, 28), np.uint8), 3.5], TypeError, "image 1: expected"),
    ],
)
def test_bad_input_gets_a_clear_error(bad, error, match):
    with pytest.raises(error, match=match):
        prepare(bad, MNIST)


def test_different_sizes_with_a_variable_model_size_are_refused():
    with pytest.raises(ValueError, match="different shapes"):
        prepare([np.zeros((10, 10, 1), np.uint8), np.zeros((12, 12, 1), np.uint8)], (None, None, 1))


def test_without_pillow_arrays_still_work_and_files_ask_for_the_extra():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['PIL'] = None\n"  # as if Pillow were not installed
        "import numpy as np\n"
        "from convserve.client.images import prepare\n"
        "assert prepare(np.zeros((2, 28, 28, 1), np.uint8), (28, 28, 1)).shape == (2, 28, 28, 1)\n"
        "assert prepare(np.zeros((28, 28, 3), np.uint8), (28, 28, 1)).shape == (1, 28, 28, 1)\n"
        "try:\n"
        "    prepare(sys.argv[1], (28, 28, 1))\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLES / "coat_6.png")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "needs Pillow: pip install 'convserve[images]'" in out.stdout

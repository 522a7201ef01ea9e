"""Turning what callers have (arrays, PNG/JPEG bytes, file paths) into the model's input batch.

`prepare(images, shape, dtype)` returns one C-contiguous (N, H, W, C) array in the model's
datatype. Channels are converted (RGB -> grayscale with the ITU-R 601-2 luma weights Pillow
uses, grayscale -> RGB by repetition, alpha dropped) and images of another size are resized
(bilinear). Pixels keep their scale: uint8 0..255, and float pixels on the same 0..255 scale,
because the model's own preprocessing (`p * scale - mean`) applies to both.

Pillow is needed only to decode encoded images and to resize; it is imported lazily and is the
`convserve[images]` extra.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

ImageSource = Any  # np.ndarray | bytes | str | os.PathLike, or a list of those
_LUMA = np.array([299, 587, 114], dtype=np.float32) / 1000.0


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "decoding or resizing images needs Pillow: pip install 'convserve[images]'"
        ) from None
    return Image


def _open(source: bytes | str | os.PathLike, name: str) -> Any:
    Image = _pillow()
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
        else:
            image = Image.open(source)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such image file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(
            f"{name}: not a readable image (expected PNG, JPEG or another format Pillow "
            f"decodes): {exc}"
        ) from None
    return image


def decode(
    source: bytes | str | os.PathLike,
    channels: int | None = None,
    size: tuple[int | None, int | None] = (None, None),
    name: str | None = None,
) -> np.ndarray:
    """Decode an encoded image (bytes or a file path) to a uint8 (H, W, C) array.

    With `channels` (1 or 3) the image is converted to grayscale or RGB; with `size` = (H, W)
    it is resized to that size (None keeps that dimension).
    """
    name = name or (
        f"{len(source)} bytes of image data"
        if isinstance(source, (bytes, bytearray, memoryview))
        else os.fspath(source)
    )
    image = _open(source, name)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise ValueError(
            f"{name}: {image.mode} images (16/32-bit) are not supported; expected 8-bit grayscale or RGB"
        )
    if channels == 1:
        image = image.convert("L")
    elif channels == 3 or image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    height, width = size
    target = (width or image.width, height or image.height)
    if target != image.size:
        image = image.resize(target, _pillow().Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _convert_channels(array: np.ndarray, channels: int | None, name: str) -> np.ndarray:
    """(N, H, W, c) -> (N, H, W, channels)."""
    have = array.shape[-1]
    if channels is None or have == channels:
        return array
    if have in (2, 4):  # drop alpha
        array, have = array[..., : have - 1], have - 1
    if have == channels:
        return array
    if have == 3 and channels == 1:
        gray = array.astype(np.float32) @ _LUMA
        if array.dtype == np.uint8:
            gray = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        return gray[..., None]
    if have == 1 and channels == 3:
        return np.repeat(array, 3, axis=-1)
    raise ValueError(
        f"{name}: cannot convert {array.shape[-1]} channels to the {channels} the model expects "
        "(supported: 1, 2, 3 or 4 channels)"
    )


def _resize(array: np.ndarray, size: tuple[int | None, int | None]) -> np.ndarray:
    """(N, H, W, C) resized to size = (H, W), bilinear, per image and channel."""
    n, h, w, c = array.shape
    target = (size[1] or w, size[0] or h)  # Pillow sizes are (width, height)
    if target == (w, h):
        return array
    Image = _pillow()
    out = np.empty((n, target[1], target[0], c), dtype=array.dtype)
    for i in range(n):
        if array.dtype == np.uint8 and c in (1, 3):
            image = Image.fromarray(array[i, :, :, 0] if c == 1 else array[i])
            resized = np.asarray(image.resize(target, Image.Resampling.BILINEAR))
            out[i] = resized.reshape(out.shape[1:])
        else:
            for k in range(c):
                channel = Image.fromarray(np.ascontiguousarray(array[i, :, :, k], dtype=np.float32))
                out[i, :, :, k] = np.asarray(channel.resize(target, Image.Resampling.BILINEAR))
    return out


def _array_batch(array: np.ndarray, shape: Sequence[int | None], name: str) -> np.ndarray:
    """An array given by the caller as one image or a batch, as (N, H, W, C)."""
    height, width, channels = shape
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise TypeError(
            f"{name}: expected an array of uint8 or float pixels, got dtype {array.dtype}"
        )
    if array.ndim == 2:  # one grayscale image (H, W)
        return array[None, :, :, None]
    if array.ndim == 3:
        # (N, H, W) grayscale batch when the last two dims are the model's size and it takes one
        # channel and the array is not plausibly one (H, W, C) image; otherwise one (H, W, C) image.
        if (
            channels == 1
            and (array.shape[1], array.shape[2]) == (height, width)
            and array.shape[2] not in (1, 2, 3, 4)
        ):
            return array[:, :, :, None]
        return array[None]
    if array.ndim == 4:
        return array
    raise ValueError(
        f"{name}: expected an image array of shape (H, W, C) or (N, H, W, C) (or (H, W) "
        f"grayscale), got shape {array.shape}"
    )


def _to_dtype(array: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    if array.dtype == dtype:
        return array
    if dtype == np.uint8:
        if array.size and (
            not np.all(np.isfinite(array))
            or array.min() < 0
            or array.max() > 255
            or not np.array_equal(array, np.round(array))
        ):
            raise ValueError(
                f"{name}: the model takes UINT8 pixels 0..255; got {array.dtype} values in "
                f"[{array.min()}, {array.max()}] that are not whole numbers in that range "
                "(float pixels use the 0..255 scale too: scale them, round, or pass uint8)"
            )
        return array.astype(np.uint8)
    if array.dtype.kind in "iu" and array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(
            f"{name}: integer pixels must be in 0..255, got values in [{array.min()}, {array.max()}]"
        )
    return array.astype(dtype)


def _items(images: ImageSource) -> Iterable[tuple[Any, str]]:
    if isinstance(images, (np.ndarray, bytes, bytearray, memoryview, str, os.PathLike)):
        images = [images]
    elif not isinstance(images, (list, tuple)):
        raise TypeError(
            "images must be a NumPy array, PNG/JPEG bytes, a file path, or a list of those; "
            f"got {type(images).__name__}"
        )
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            yield item, os.fspath(item)
        else:
            yield item, f"image {i}"


def prepare(images: ImageSource, shape: Sequence[int | None], dtype: Any = np.uint8) -> np.ndarray:
    """Everything in `images` as one (N, H, W, C) batch of `dtype` for a model of input `shape`.

    `shape` is the model's (H, W, C); a None (variable) dimension is left as it comes.
    """
    height, width, channels = shape
    dtype = np.dtype(dtype)
    batches = []
    for item, name in _items(images):
        if isinstance(item, np.ndarray):
            batch = _convert_channels(_array_batch(item, shape, name), channels, name)
            batch = _to_dtype(_resize(batch, (height, width)), dtype, name)
        elif isinstance(item, (bytes, bytearray, memoryview, str, os.PathLike)):
            batch = _to_dtype(decode(item, channels, (height, width), name)[None], dtype, name)
        else:
            raise TypeError(
                f"{name}: expected a NumPy array, PNG/JPEG bytes or a file path, got {type(item).__name__}"
            )
        batches.append(batch)
    if not batches:
        raise ValueError("images is empty: expected at least one image")
    sizes = {b.shape[1:] for b in batches}
    if len(sizes) > 1:
        raise ValueError(
            f"images have different shapes {sorted(sizes)} and the model's input size is variable; "
            "pass images of one size"
        )
    batch = batches[0] if len(batches) == 1 else np.concatenate(batches)
    if batch.shape[0] == 0:
        raise ValueError("images is empty: expected at least one image")
    return np.ascontiguousarray(batch)

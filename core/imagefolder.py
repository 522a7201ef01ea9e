"""Image folders as training data: one subfolder per class of PNG/JPEG files.

The layout of Keras's `image_dataset_from_directory` and torchvision's `ImageFolder`:

    DIR/<class>/<file>.png                 all images; the trainer holds out --validation-split
    DIR/train/<class>/...  DIR/test/<class>/...  (and/or DIR/val/<class>/...)   explicit splits

Class names are the subfolder names in sorted order (label 0 is the first). Images are decoded
with Pillow, converted to grayscale or RGB as the architecture asks and resized (bilinear) to
its input. Unreadable files are reported by name and skipped.

Decoding runs once: the arrays are cached in `$XDG_CACHE_HOME/convserve/image-folders/` (default
`~/.cache/...`), one `.npz` per folder and input shape. The cache stores a fingerprint of the
listing (every file's relative path, size and modification time); any added, removed or changed
file makes the next load decode again and replace the entry. Deleting the directory is safe.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from convserve.core.datasets import DataError, Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TRAIN_NAMES = ("train",)
TEST_NAMES = ("test",)
VAL_NAMES = ("val", "validation")
IMAGES_EXTRA = "pip install 'convserve[images]'"
CACHE_FORMAT = 1  # bump when the cached arrays change meaning

Log = Callable[[str], None]


def _visible_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(directory: Path) -> list[Path]:
    """Image files anywhere below `directory` (class folders may nest), in sorted order."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            Path(root) / f
            for f in sorted(files)
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
        ]
    return found


def _split_dirs(directory: Path) -> dict[str, Path] | None:
    """{'train': ..., 'test': ..., 'val': ...} for a split layout, None for a flat one."""
    names = {p.name.lower(): p for p in _visible_dirs(directory)}
    splits = {}
    for split, candidates in (("train", TRAIN_NAMES), ("test", TEST_NAMES), ("val", VAL_NAMES)):
        for name in candidates:
            if name in names:
                splits[split] = names[name]
                break
    if "train" not in splits:
        return None
    # train/ alone with images directly in class folders is a split layout too
    return splits


def looks_like_image_folder(directory: Path) -> bool:
    """True when some subfolder (class) holds image files."""
    return any(_images_under(d) for d in _visible_dirs(directory)[:64])


def _class_files(directory: Path) -> dict[str, list[Path]]:
    classes = {d.name: _images_under(d) for d in _visible_dirs(directory)}
    return {name: files for name, files in classes.items() if files}


def decode_image(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """One image file as uint8 (height, width, channels): grayscale or RGB, resized (bilinear)."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise DataError(f"decoding {path.name} needs Pillow: {IMAGES_EXTRA}") from None

    mode = {1: "L", 3: "RGB"}[channels]
    with Image.open(path) as image:
        image.draft(mode, (width, height))  # JPEG: decode at a reduced scale when much larger
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            # transparent pixels over white, as a viewer shows them
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert(mode)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, np.uint8)
    return pixels.reshape(height, width, channels)


def _fingerprint(root: Path, files: list[Path], shape: tuple[int, int, int]) -> str:
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, list(shape)]).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convserve" / "image-folders"


def _cache_path(root: Path, shape: tuple[int, int, int]) -> Path:
    key = hashlib.sha256(f"{root}\0{list(shape)}".encode()).hexdigest()[:20]
    return cache_directory() / f"{root.name or 'root'}-{key}.npz"


def _read_cache(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if str(archive["fingerprint"]) != fingerprint:
                return None
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent, stale format or damaged: decode again


def _write_cache(path: Path, arrays: dict[str, np.ndarray], log: Log) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(buffer.getvalue())
        os.replace(temporary, path)
    except OSError as exc:  # a read-only home still trains, it just decodes every time
        log(f"image cache not written ({exc}); the next run decodes again")


def load_image_folder(
    directory: str | os.PathLike,
    image_shape: tuple[int, int, int],
    *,
    progress: bool = False,
    log: Log | None = None,
) -> Dataset:
    """Decode an image folder to uint8 NHWC arrays of `image_shape` (channels 1 or 3)."""
    import sys

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    root = Path(directory).resolve()
    height, width, channels = (int(v) for v in image_shape)
    if channels not in (1, 3):
        raise DataError(
            f"{directory}: image folders need an architecture with 1 (grayscale) or 3 (RGB) input "
            f"channels, this one has {channels}"
        )
    splits = _split_dirs(root) or {"train": root}
    per_split = {split: _class_files(path) for split, path in splits.items()}
    classes = sorted(per_split["train"])
    if not classes:
        raise DataError(
            f"{splits['train']}: no class subfolders with image files ({', '.join(IMAGE_SUFFIXES)})"
        )
    for split, found in per_split.items():
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(
                f"{splits[split]}: class folder(s) {unknown} are not in the training classes {classes}"
            )
    listing = [
        (split, classes.index(name), path)
        for split, found in per_split.items()
        for name in sorted(found)
        for path in found[name]
    ]
    fingerprint = _fingerprint(root, [item[2] for item in listing], (height, width, channels))
    cache = _cache_path(root, (height, width, channels))
    arrays = _read_cache(cache, fingerprint)
    if arrays is None:
        arrays = _decode_all(root, listing, (height, width, channels), progress, log)
        arrays["fingerprint"] = np.array(fingerprint)
        _write_cache(cache, arrays, log)
    else:
        log(f"{root}: decoded images from the cache {cache}")
    skipped = [str(v) for v in arrays["skipped"]]
    if skipped:
        for line in skipped:
            log(f"skipped unreadable image {line}")
        log(f"skipped {len(skipped)} unreadable file(s) of {len(listing)}")

    def part(split: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        if f"x_{split}" not in arrays or len(arrays[f"y_{split}"]) == 0:
            return None, None
        return arrays[f"x_{split}"], arrays[f"y_{split}"].astype(np.int64)

    x_train, y_train = part("train")
    if x_train is None:
        raise DataError(f"{splits['train']}: no readable training images")
    x_test, y_test = part("test")
    x_val, y_val = part("val")
    return Dataset(
        x_train,
        y_train,
        x_test,
        y_test,
        source=str(root),
        class_names=classes,
        x_val=x_val,
        y_val=y_val,
    )


def _decode_all(
    root: Path,
    listing: list[tuple[str, int, Path]],
    shape: tuple[int, int, int],
    progress: bool,
    log: Log,
) -> dict[str, np.ndarray]:
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"reading image folders needs Pillow: {IMAGES_EXTRA}") from None
    from tqdm import tqdm

    images = {split: [] for split, _, _ in listing}
    labels: dict[str, list[int]] = {split: [] for split in images}
    skipped: list[str] = []
    for split, label, path in tqdm(
        listing, desc=f"decoding {root.name}", unit="img", disable=not progress, dynamic_ncols=True
    ):
        try:
            pixels = decode_image(path, *shape)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            skipped.append(f"{path}: {exc}".replace("\n", " "))
            continue
        images[split].append(pixels)
        labels[split].append(label)
    arrays: dict[str, np.ndarray] = {"skipped": np.array(skipped, dtype=str)}
    for split in images:
        arrays[f"x_{split}"] = (
            np.stack(images[split]) if images[split] else np.zeros((0, *shape), np.uint8)
        )
        arrays[f"y_{split}"] = np.array(labels[split], np.int64)
    return arrays


def adopt_class_names(doc: dict, names: list[str], log: Log) -> dict:
    """The architecture document with `labels` = the folder names; a last dense layer whose
    unit count differs from the number of classes is resized to it (said in the log)."""
    doc = json.loads(json.dumps(doc))  # a copy: presets and callers' documents stay as they were
    layers = doc.get("layers")
    last = layers[-1] if isinstance(layers, list) and layers else None
    if isinstance(last, dict) and last.get("type") == "dense" and last.get("units") != len(names):
        log(f"last dense layer: {last.get('units')} units -> {len(names)}, one per class folder")
        last["units"] = len(names)
    doc["labels"] = list(names)
    return doc

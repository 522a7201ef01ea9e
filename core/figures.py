"""Figures as PNG (matplotlib, the optional `plot` extra): the confusion-matrix heat map of
`convserve evaluate` and the look-inside figure of `convserve visualize`."""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from convserve.core.layers import Layer
from convserve.core.modelfile import atomic_write

PLOT_EXTRA = "pip install 'convserve[plot]'"


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message says which extra brings it."""


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or MissingExtra naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra(f"drawing PNG figures needs matplotlib: {PLOT_EXTRA}") from None
    return plt


def _save(fig: Any, path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    atomic_write(path, buffer.getvalue())


def draw_confusion(
    path: str | os.PathLike, counts: np.ndarray, labels: list[str], title: str
) -> None:
    """Heat map of counts[true, predicted], coloured by the share of each true class; counts
    written in the cells (up to 30 classes)."""
    plt = pyplot()
    n = len(labels)
    size = max(6.0, 0.55 * n + 3)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), layout="constrained")
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    ax.text(
                        j, i, f"{counts[i, j]}", ha="center", va="center", color=colour, fontsize=8
                    )
    _save(fig, path)


def _mosaic(tiles: np.ndarray, columns: int) -> np.ndarray:
    """(count, h, w[, 3]) tiles, each already scaled to [0, 1] -> one image with 1-pixel gaps
    (NaN, drawn as the background)."""
    count, h, w = tiles.shape[:3]
    rows = math.ceil(count / columns)
    shape = (rows * (h + 1) - 1, columns * (w + 1) - 1, *tiles.shape[3:])
    canvas = np.full(shape, np.nan)
    for k in range(count):
        r, c = divmod(k, columns)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tiles[k]
    return canvas


def _scale_each(tiles: np.ndarray, symmetric: bool) -> np.ndarray:
    """Each tile to [0, 1] by its own range (symmetric about 0 for signed weights)."""
    flat = tiles.reshape(len(tiles), -1)
    if symmetric:
        bound = np.abs(flat).max(axis=1)
        bound[bound == 0] = 1
        scaled = 0.5 + 0.5 * flat / bound[:, None]
    else:
        low, high = flat.min(axis=1), flat.max(axis=1)
        span = np.where(high > low, high - low, 1)
        scaled = (flat - low[:, None]) / span[:, None]
    return scaled.reshape(tiles.shape)


def _grid_columns(count: int) -> int:
    return max(1, math.ceil(math.sqrt(count * 1.6)))


def _show_channels(ax: Any, maps: np.ndarray, title: str) -> None:
    """All channels of one image's (H, W, C) feature map in a grid, numbered."""
    tiles = _scale_each(np.moveaxis(maps, -1, 0), symmetric=False)
    columns = _grid_columns(len(tiles))
    cmap = pyplot().get_cmap("viridis").with_extremes(bad="white")
    ax.imshow(_mosaic(tiles, columns), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    h, w = maps.shape[:2]
    if len(tiles) <= 256:
        for k in range(len(tiles)):
            r, c = divmod(k, columns)
            ax.text(c * (w + 1), r * (h + 1), str(k), color="white", fontsize=6, va="top")
    ax.set_title(title, fontsize=11)
    ax.axis("off")


def draw_activations(
    path: str | os.PathLike,
    image: np.ndarray,
    first: Layer,
    kernel: np.ndarray | None,
    maps: list[tuple[Layer, np.ndarray]],
    top: list[tuple[str, float]],
    title: str,
) -> None:
    """One figure: the input image, the first layer's filters (if it is a convolution), the
    top predictions, and per conv layer all channels of its feature maps for this image."""
    plt = pyplot()
    fig = plt.figure(figsize=(15, 4.2 + 5.2 * len(maps)), layout="constrained")
    fig.suptitle(title, fontsize=14)
    rows = fig.subfigures(1 + len(maps), 1, height_ratios=[4.2] + [5.2] * len(maps))
    rows = np.atleast_1d(rows)
    ax_image, ax_filters, ax_top = rows[0].subplots(1, 3, width_ratios=[1, 1.6, 1.4])

    channels = image.shape[-1]
    shown = image[..., 0] if channels == 1 else image[..., :3]
    ax_image.imshow(shown, cmap="gray" if channels == 1 else None, interpolation="nearest")
    ax_image.set_title(f"input {'x'.join(map(str, image.shape))}", fontsize=11)
    ax_image.axis("off")

    if kernel is not None:  # (kh, kw, in, out) -> one tile per filter
        filters = np.moveaxis(kernel, -1, 0)
        rgb = filters.shape[-1] == 3
        tiles = _scale_each(filters if rgb else filters.mean(axis=-1), symmetric=True)
        cmap = pyplot().get_cmap("RdBu_r").with_extremes(bad="white")
        ax_filters.imshow(
            _mosaic(tiles, _grid_columns(len(tiles))),
            cmap=None if rgb else cmap,
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        how = "RGB" if rgb else ("weights" if filters.shape[-1] == 1 else "mean over inputs")
        ax_filters.set_title(
            f"{first.label}: {len(tiles)} filters {first.kernel_size[0]}x{first.kernel_size[1]}\n"
            f"({how}; red positive, blue negative)"
            if not rgb
            else f"{first.label}: {len(tiles)} filters {first.kernel_size[0]}x{first.kernel_size[1]} ({how})",
            fontsize=11,
        )
    else:
        ax_filters.text(0.5, 0.5, f"{first.label} has no filters", ha="center", va="center")
    ax_filters.axis("off")

    names = [name for name, _ in top][::-1]
    scores = [score for _, score in top][::-1]
    bars = ax_top.barh(range(len(top)), scores, color="tab:blue")
    bars[-1].set_color("tab:orange")
    ax_top.set_yticks(range(len(top)), names)
    ax_top.set_xlim(0, max(1.0, max(scores) * 1.15) if scores else 1.0)
    for k, score in enumerate(scores):
        ax_top.text(
            score,
            k,
            f" {score:.3f}" if score >= 1e-3 or score == 0 else f" {score:.1e}",
            va="center",
            fontsize=10,
        )
    ax_top.set_xlabel("score")
    ax_top.set_title(f"top {len(top)}: {top[0][0]}" if top else "scores", fontsize=11)

    for row, (layer, values) in zip(rows[1:], maps):
        ax = row.subplots()
        h, w, c = values.shape
        _show_channels(
            ax,
            values,
            f"{layer.label} {layer.describe()}: {c} feature maps {h}x{w} "
            f"(each scaled to its own range; range {values.min():.2f} to {values.max():.2f})",
        )
    _save(fig, path)

"""2-D convolution (NHWC, Keras `channels_last`) + bias + activation, with the inference kernels
chosen per shape and the training forward/backward.

At inference a conv block (see `fusion.py`: the conv, a standalone activation after it, a max
or average pool after that) becomes one of these steps:
- `WinogradConv` (variants `winograd`: 3x3 stride 1, F(2x2, 3x3); `winograd4`: the same by
  F(4x4, 3x3); `winograd5`: 5x5 stride 1, F(2x2, 5x5); `winograd4_phases`: stride 2 with
  kernels of 4-6 a side, as a 3x3 conv over the input's four 2x2 phases by F(4x4, 3x3);
  `winograd_phases`: the same by F(2x2, 3x3);
  `winograd4_split`: stride 1 with other kernels (2x2, 4x4, 5x5, 6x6, 7x7, ...), as 3x3 convs
  over shifted inputs by F(4x4, 3x3)), pooled or not;
- `K3PoolConv` / `PixelsPoolConv` (`k3_pool`, `pixels_pool`): a 1-input-channel layer fused
  with a 2x2/2 max pool (`pixels_pool`: or average pool);
- `DirectConv` (`direct`): every shape (any kernel size, stride and padding); `direct_narrow`
  the same in blocks of 32 output channels (7-8 pixels a micro-kernel call); `patches` the
  same over groups of pixels' receptive fields copied into rows (im2col), for conv rows
  shorter than a micro-kernel block.
A 2x2/2 pool that tiles its input (`valid`, or `same` on even sides), max or average, is
fused into the Winograd and direct kernels; a max or average pool of any other window, stride
and padding into the direct kernel (`direct.conv_pool`).
`inference_variants` lists the ones that apply, today's heuristic choice first (Winograd: 3x3,
4x4 and larger in 3x3 blocks, 5x5 by F(2x2, 5x5) where the blocks' kernel would be large,
from WINO_MIN_CHANNELS input channels on; over the phases from 16; else the first-layer
kernels, else direct); the planner
(`core/planner.py`) may time them and pick another.
Otherwise the pool runs as its own step after the conv; a softmax as an `Activate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from convserve.core.activations import CODES, LINEAR, RELU, SOFTMAX
from convserve.core.kernels import direct, first_layer, gemm, winograd
from convserve.core.kernels.winograd_transforms import F2X2_3X3, F2X2_5X5, F4X4_3X3, Transform
from convserve.core.layers import base
from convserve.core.layers.base import NO_PADS, PADDINGS, Layer
from convserve.core.layers.dense import round_up
from convserve.core.layers.pooling import AveragePooling2D, MaxPooling2D
from convserve.core.steps import INPUT, Activate, Padding, Program, Step
from convserve.core.threads import splits
from convserve.core.training import kernels as K
from convserve.core.training.layers import activate, activation_grad

WINO_MIN_CHANNELS = 8  # below this many input channels a GEMM over them is too short to pay
# The most tiles a Winograd task's GEMMs take (whole rows of tiles of one image): more rows per
# GEMM read each transformed weight for more tiles.
BAND_TILES = 16
# The most bytes of receptive fields a `patches` task copies (its per-thread scratch)
PATCH_MAX_BYTES = 4 << 20
# Conv rows shorter than two micro-kernel blocks (`gemm.PEAK_BLOCK`) leave blocks part empty:
# an unpooled direct conv with such rows runs by `direct.conv_runs`, in runs of up to
# RUN_PIXELS pixels over several rows (`DirectConv._runs`). On an Intel Xeon (AVX-512), one
# process, against rows: strided5's 5x5/2 64 -> 128 layer (4x4 outputs) at one image, alone,
# 41.3 us against 45.1 on one thread; the strided net's 3x3/2 64 -> 128 layer (8x8 outputs) in
# the model at 8 images, 241-244 us against 255-260 on two threads
RUN_ROWS_UNDER = 2 * gemm.PEAK_BLOCK[0]
# From this many bytes of padded input an image, an unpadded conv's tasks pad and preprocess
# the input rows they read (`direct.conv_raw`) rather than read a padding copy of the batch.
# On an Intel Xeon (AVX-512), 3x3/2 over 128x128x3 (200 KB an image) took 0.78-0.82x the
# time of copy and conv at 32 images, 0.91-0.92x at 8, 0.89-0.96x at one; over 32x32x3 (14 KB)
# the rows cost about as much as a copy that stays in cache or more: 5x5/2 1.10-1.34x at 1 and
# 8 images, 3x3 stems 0.87-1.18x
RAW_ROWS_MIN_BYTES = 64 * 1024
# Most pixels a run of `conv_runs` takes: each chunk of weights serves all of a run's pixels
# before the next, so longer runs read the weights from L2 less often. On an Intel Xeon
# (AVX-512), two threads, per call in the model against runs of 24: the strided net's 3x3/2
# 64 -> 128 layer (8x8 outputs) at 32 images 860-864 us against 882-892, strided_rgb128's
# 3x3/2 64 -> 64 one at 8 images 104-106 against 109-112 (alone at 32: 0.87-0.93x and
# 0.93-0.94x); at one image alike
RUN_PIXELS = 64
# A 1x1 stride-1 conv whose input and output are plain (N, H, W, C) arrays reads and writes
# each image's pixels as one contiguous row: `direct.conv` then runs it as one long row an
# image, in pieces of at least this many pixels, each 64-channel block of weights over all
# of a piece's pixels before the next block, the micro-kernels storing bias and activation
# straight into the output. Rows of W pixels switch blocks every W pixels (and read weights
# past L1 from L2 again); runs (`conv_runs`) pass their sums through a tile. On an Intel Xeon
# (AVX-512), two threads: per call in the model, 128 -> 256 over 8x8 (pointwise_wide) at 32
# images 404-410 us against 433-462 by runs of 24 pixels, at 8 94-97 against 102-106, at one
# 14.5-15.1 against 15.2-15.4; alone against runs of 64 (RUN_PIXELS), 0.93-0.99x the time at
# 32 images, 0.93-0.95x at 8; alone, 128 -> 128 over 16x16 at 32 images 0.91-0.94x the time
# of rows, 64 -> 128 alike.
IMAGE_ROW_PIECE_PIXELS = 32
WINOGRAD: dict[str, Transform] = {  # variant: its transform
    "winograd": F2X2_3X3,
    "winograd4": F4X4_3X3,
    "winograd5": F2X2_5X5,
    # stride-2 convs with kernels of 4-6 a side, as 3x3 stride-1 convs over the input's four
    # 2x2 phases (`view_kernel`)
    "winograd4_phases": F4X4_3X3,
    "winograd_phases": F2X2_3X3,  # the same by F(2x2, 3x3)
    # stride-1 convs with kernels other than 3x3, as sums of 3x3 convs over shifted inputs
    # (`split_views`)
    "winograd4_split": F4X4_3X3,
}
# The largest transformed kernel `winograd4_split` is offered with: 36 * gh * gw products of
# each channel pair, 6.6x a 7x7 kernel's floats (a 7x7 conv of 512 -> 512 channels would hold
# 340 MB where direct holds 51 MB).
SPLIT_MAX_BYTES = 64 * 2**20
# A 5x5 kernel in 2x2 blocks of 3x3 multiplies as often as F(2x2, 5x5) (9 times per output and
# channel) and transforms each output 4x less often, but its transformed kernel is 4x larger.
# Against `winograd5` on AMD Zen 3 (one process, 1 / 8 / 64 images), transformed kernels of
# 0.2-2.4 MB: 8-48 input channels 0.71-0.94x the time, 64 -> 64 on 32x32 0.93-0.95x, on 16x16
# 1.03x / 0.96x / 0.97x; 9.4 MB (128 -> 128 on 8x8) 1.27x / 1.00x / 1.04x (read at one image
# for only 4 tiles of 4x4). Above this size `winograd5` stays the heuristic's choice.
FIVE_SPLIT_MAX_BYTES = 4 * 2**20
PLAIN = (1, 1, 0, 1)  # `WinogradConv.views` of a tile that reads the input itself
PHASES = (2, 2, 1, 2)  # of a stride-2 conv over the input's four 2x2 phases (`view_kernel`)


# -- weight packing -----------------------------------------------------------------------------
def in_strips(matrix: np.ndarray) -> np.ndarray:
    """(..., K, C) -> (..., C/16 * K, 16): the columns in strips of 16, each strip's K rows
    contiguous (`gemm.STRIPS`). C a multiple of 16."""
    *lead, k, c = matrix.shape
    strips = matrix.reshape(*lead, k, c // 16, 16).swapaxes(-3, -2)
    return np.ascontiguousarray(strips).reshape(*lead, c // 16 * k, 16)


def pack_gemm(
    kernel: np.ndarray, bias: np.ndarray | None, strips: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """GEMM form `wk[K, COp]` (row k: tap k in (ky, kx, ci) order; COp: filters rounded up to
    16, zero columns), `in_strips` with `strips` (default: `gemm.STRIPS`, by the register file),
    and the bias padded to COp."""
    kh, kw, ci, co = kernel.shape
    k = kh * kw * ci
    wk = np.zeros((k, round_up(co, 16)), np.float32)
    wk[:k, :co] = kernel.reshape(k, co)
    b = np.zeros(wk.shape[1], np.float32)
    if bias is not None:
        b[:co] = bias
    return (in_strips(wk) if _strips(strips) else wk), b


def winograd_kernel(
    kernel: np.ndarray, cop: int, transform: Transform, strips: bool | None = None
) -> np.ndarray:
    """The transformed kernel G g G^T as (alpha*alpha, CI, COp), computed in float64;
    `in_strips` with `strips` (default: `gemm.STRIPS`)."""
    u = transform.kernel(kernel)
    out = np.zeros((*u.shape[:2], cop), np.float32)
    out[:, :, : u.shape[2]] = u
    return in_strips(out) if _strips(strips) else out


def split_views(kernel_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The views (`WinogradConv.views`) of a stride-1 kernel in 3x3 blocks: gh x gw blocks,
    the kernel zero padded to 3*gh x 3*gw, block (a, b) over the input from 3a rows and 3b
    columns on."""
    kh, kw = kernel_size
    return (-(-kh // 3), -(-kw // 3), 3, 1)


def tile_views(variant: str, kernel_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The input views a Winograd variant's tile reads (`WinogradConv.views`): the 2x2 phases
    for `winograd4_phases` and `winograd_phases`, 3x3 blocks for `winograd4_split`, else the
    input itself."""
    if variant in ("winograd4_phases", "winograd_phases"):
        return PHASES
    if variant == "winograd4_split":
        return split_views(kernel_size)
    return PLAIN


def view_window(views: tuple[int, int, int, int]) -> tuple[int, int]:
    """The input rows and columns a tile's views reach past a 3x3 window's: the window of the
    conv they compute (6x6 for a stride-2 one over the phases, 3*gh x 3*gw for blocks)."""
    gh, gw, shift, down = views
    return shift * (gh - 1) + 2 * down + 1, shift * (gw - 1) + 2 * down + 1


def view_kernel(kernel: np.ndarray, views: tuple[int, int, int, int]) -> np.ndarray:
    """A kernel (kh, kw, CI, CO) as the 3x3 kernel (3, 3, gh*gw*CI, CO) over the input's views
    (`winograd._wino_input`): tap (i, j) of view (a, b), channels (a*gw + b) * CI + ci, is tap
    (shift*a + down*i, shift*b + down*j) of the kernel, zero past its edge. The 2x2 phases of a
    stride-2 conv (PHASES): tap (2i + p, 2j + q) for phase (p, q); 3x3 blocks (`split_views`):
    tap (3a + i, 3b + j)."""
    gh, gw, shift, down = views
    kh, kw, ci, co = kernel.shape
    rows, cols = view_window(views)
    if kh > rows or kw > cols:
        raise ValueError(f"a {kh}x{kw} kernel reaches past its views {views}")
    out = np.zeros((3, 3, gh * gw * ci, co), kernel.dtype)
    for a in range(gh):
        for b in range(gw):
            channels = slice((a * gw + b) * ci, (a * gw + b + 1) * ci)
            for i in range(3):
                for j in range(3):
                    y, x = shift * a + down * i, shift * b + down * j
                    if y < kh and x < kw:
                        out[i, j, channels] = kernel[y, x]
    return out


def _strips(strips: bool | None) -> bool:
    return gemm.STRIPS if strips is None else strips


def channel_blocks(kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Pack a conv kernel for the channel-vector kernels: (ceil(CO/16), taps + 1, 16), per block
    of 16 output channels the taps in (ky, kx, ci) order then the bias, zero padded."""
    co = kernel.shape[-1]
    nb = (co + 15) // 16
    taps = np.zeros((kernel.size // co + 1, nb * 16), np.float32)
    taps[:-1, :co] = kernel.reshape(-1, co)
    taps[-1, :co] = bias[:co]
    return np.ascontiguousarray(taps.reshape(-1, nb, 16).transpose(1, 0, 2))


# -- inference steps ----------------------------------------------------------------------------
POOL2 = (2, 2, 2, 2, 0, 0)  # a 2x2/2 pool that tiles its input (`direct.conv_pool2`)


def pool_bands(n: int, rows: int, threads: int) -> int:
    """Bands of pooled rows an image for `direct.conv_pool` on n images of `rows` pooled rows:
    the fewest (a power of two, fewer than 2 * threads) that give every thread as many tasks,
    while there are fewer than 8 a thread. Each band repeats the conv rows its windows share
    with the band before. On a Zen 3, 3x3/2 over 32x32x32 on two threads took 0.62-0.65x the
    time at 1 image in 2 bands, 0.81-0.94x at 3-9 images (odd counts), and 1.02x at 2 and 16
    (even counts; 4 bands: 0.64-1.09x), interleaved in one process."""
    bands = 1
    while n * bands % threads and n * bands < 8 * threads and bands < threads and bands < rows:
        bands *= 2
    return bands


@dataclass(kw_only=True)
class DirectConv(Step):
    """`direct.conv` on the padded input; with a fused max (average with `average`) pool,
    pool = (window, strides, top and left padding, conv rows and columns the pool reads),
    `direct.conv_pool2` for POOL2, else `direct.conv_pool`."""

    PLACES_OUTPUT: ClassVar[bool] = True

    wk: np.ndarray
    bias: np.ndarray
    window: tuple[int, int]
    strides: tuple[int, int]
    act: int
    pool: tuple[int, ...] | None = None
    average: bool = False
    narrow: bool = False  # blocks of 32 output channels (`gemm._conv_row`)
    patches: bool = False  # by groups of pixels' receptive fields (`direct.conv_patches`)

    @property
    def tiles_2x2(self) -> bool:
        """The fused pool is 2x2/2 and tiles the conv output (`direct.conv_pool2`); a `same`
        one on odd sides pads the bottom and right instead."""
        return self.pool == (*POOL2, 2 * self.shape[0], 2 * self.shape[1])

    @property
    def by_runs(self) -> bool:
        """Runs by `direct.conv_runs`: no pool, no patches, rows under RUN_ROWS_UNDER."""
        return self.pool is None and not self.patches and self.shape[1] < RUN_ROWS_UNDER

    def tile_floats(self) -> int:
        cop = self.bias.size
        if self.by_runs:
            return RUN_PIXELS * cop
        if self.patches:
            return direct.PATCH_GROUP * (self.wk.size // cop + cop) + 16
        if self.pads_rows:
            ci = self.padding.shape[2]
            return direct.raw_tile_floats(self.shape[1], cop, self.window, self.strides[1], ci)
        if self.pool is None or self.tiles_2x2:
            return (4 if self.pool else 1) * self.shape[1] * cop
        ph, cols = self.pool[0], self.pool[7]
        return (cols + ph * self.shape[1] + 4) * cop  # `direct.conv_pool`'s rows

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        narrow = int(self.narrow)
        if self.pads_rows and program.copies_input(self, x):
            ways = self._row_splits(program)
            p = self.padding
            # the caller's input: its tasks can scan it for NaN and infinity as they read it
            # (`direct.conv_raw`), so the pass need not scan it first
            scan = x is INPUT
            program.add(
                direct.conv_raw, x, *program.scale_shift, int(program.raw), self.wk, self.bias,
                program.tiles, out, *self.window, *self.strides, self.act, ways, program.at,
                narrow, (p.pt, p.pl), program.scan_wanted if scan else direct.NO_SCAN,
                program.scan_flags,
            )  # fmt: skip
            program.scans_input = program.scans_input or scan
            return out
        x = program.pad(self, x)
        args = (x, self.wk, self.bias, program.tiles, out, *self.window, *self.strides, self.act)
        if self.patches:  # groups of pixels, at least one task per thread
            pixels = program.n * self.shape[0] * self.shape[1]
            if pixels <= direct.PATCH_GROUP:
                # one group, its channels in ranges: each thread then reads only its share of
                # the weights, once for every pixel, instead of all of them for half the pixels
                group = pixels
                ways = splits(1, self.bias.size // 16, program.threads, per_thread=1)
            else:
                group = max(1, min(direct.PATCH_GROUP, -(-pixels // program.threads)))
                ways = 1
            program.add(direct.conv_patches, *args, group, ways, program.at)
            return out
        if self.pool is not None and not self.tiles_2x2:
            bands = pool_bands(program.n, self.shape[0], program.threads)
            program.add(direct.conv_pool, *args, self.pool, self.average, bands, program.at, narrow)
            return out
        if self._image_rows(program, x, out):
            n, (oh, ow, co), ci = program.n, self.shape, x.shape[3]
            pixels = oh * ow
            ways = splits(n, pixels // IMAGE_ROW_PIECE_PIXELS, program.threads)
            rows_in, rows_out = x.reshape(n, 1, pixels, ci), out.reshape(n, 1, pixels, co)
            program.add(
                direct.conv, rows_in, self.wk, self.bias, program.tiles, rows_out, 1, 1, 1, 1,
                self.act, ways, (0, 0, 1, pixels), narrow,
            )  # fmt: skip
            return out
        if self.by_runs:
            per, parts = self._runs(program.n, program.threads)
            program.add(direct.conv_runs, *args, per, parts, program.at, narrow)
            return out
        ways = self._row_splits(program)
        if self.pool:
            program.add(direct.conv_pool2, *args, self.average, ways, program.at, narrow)
        else:
            program.add(direct.conv, *args, ways, program.at, narrow)
        return out

    def _image_rows(self, program: Program, x: Any, out: Any) -> bool:
        """Whether `emit` runs this conv as one row of pixels an image (IMAGE_ROW_PIECE_PIXELS):
        1x1, stride 1, no pool or patches; input and output plain arrays of whole images (no
        padding border, not the caller's input or result); bias and ReLU or no activation
        stored by the micro-kernels (`direct.conv`'s fused stores: real channels a multiple
        of 16, weights in rows), so no per-task tile of the long row; and at least one piece
        a thread (fewer: by rows, or by runs, which then split the channels)."""
        oh, ow, co = self.shape
        plain = isinstance(x, np.ndarray) and isinstance(out, np.ndarray)
        return (
            plain
            and self.window == (1, 1)
            and self.strides == (1, 1)
            and self.pool is None
            and not self.patches
            and tuple(program.at) == (0, 0, oh, ow)
            and x.shape[1:3] == (oh, ow)
            and out.shape[1:] == (oh, ow, co)
            and x.flags.c_contiguous
            and out.flags.c_contiguous
            and self.act <= 1
            and self.bias.size == co
            and self.wk.shape[1] == co
            and program.n * (oh * ow // IMAGE_ROW_PIECE_PIXELS) >= program.threads
        )

    @property
    def pads_rows(self) -> bool:
        """Runs by `direct.conv_raw` where its input needs a padding copy: no pool, no patches,
        no runs, and RAW_ROWS_MIN_BYTES of padded input an image or more."""
        plain = self.pool is None and not self.patches and not self.by_runs
        large = self.padding is not None and 4 * np.prod(self.padding.shape) >= RAW_ROWS_MIN_BYTES
        return plain and bool(large)

    def _row_splits(self, program: Program) -> int:
        """Pieces a conv row (two with a fused pool) splits into for `direct.conv`,
        `conv_raw` and `conv_pool2`: of 8 conv pixels at least: a shorter piece runs its
        micro-kernel calls on fewer pixels than the thread it frees gains (lenet5's 6 -> 16
        conv at one image on Zen 5: its 10-pixel rows whole 4.0-6.3 us, in 6 + 4 4.7-6.9,
        6-16 % faster in each of 3 processes)."""
        row_pixels = self.shape[1] * (2 if self.pool else 1)
        return splits(program.n * self.shape[0], max(1, row_pixels // 8), program.threads)

    def _runs(self, n: int, threads: int) -> tuple[int, int]:
        """(pixels a task, ranges of output channels) of `direct.conv_runs` for a batch of n:
        runs of up to RUN_PIXELS pixels; where an image's runs leave a thread idle, the
        channels split in ranges of whole 16s, 64 or more (each thread then reads only its
        range's weights), then the runs shorten until the tasks are a multiple of the
        threads."""
        pixels = self.shape[0] * self.shape[1]
        runs = -(-pixels // RUN_PIXELS)
        parts = splits(n * runs, max(1, self.bias.size // 64), threads, per_thread=1)
        tasks = n * runs * parts
        if tasks < 4 * threads and tasks % threads:
            wanted = -(-tasks // threads) * threads  # rounded up to a multiple of the threads
            runs = min(pixels, -(-wanted // (n * parts)))
        return -(-pixels // runs), parts


@dataclass(kw_only=True)
class WinogradConv(Step):
    """`winograd.conv_wino`: F(size x size, r x r), r from the products in `u`, optionally
    fused with a 2x2/2 max pool (average pool with `average`)."""

    PLACES_OUTPUT: ClassVar[bool] = True

    u: np.ndarray
    bias: np.ndarray
    act: int
    pool: bool
    average: bool = False
    size: int = 2  # outputs per tile side, m
    # the input's views a tile reads (`winograd.conv_wino`): (1, 1, 0, 1) the input itself;
    # (2, 2, 1, 2) its 2x2 phases; (gh, gw, 3, 1) shifted (`split_views`); `view_kernel`
    views: tuple[int, int, int, int] = PLAIN

    def _tiles(self, outputs: int) -> int:
        """Tiles along a side of `outputs` output pixels (pooled ones with a fused pool)."""
        per = self.size // 2 if self.pool else self.size
        return (outputs + per - 1) // per

    def _most_band(self) -> int:
        """The most rows of tiles a task takes: up to BAND_TILES tiles."""
        return max(1, BAND_TILES // self._tiles(self.shape[1]))

    def _band(self, n: int, threads: int) -> int:
        """Rows of tiles per task for a batch of n images, the images' rows one after another:
        as many as `_most_band`, in bands of equal height, while there is a band for every
        thread. An image of fewer than BAND_TILES / 2 tiles shares its bands with the next
        images, as many bands for every thread: a 5x5/2 layer over 64 channels with 4x4 outputs
        (one F(4x4, 3x3) tile an image) took 0.43-0.47x the time at 8 and 32 images on Zen 3 in
        bands of 4-16 images than in a band per image (fastest of 300 calls, 3 processes
        each); one over 32 channels with 8x8 outputs (4 tiles an image) 0.90-1.00x."""
        rows, cols = self._tiles(self.shape[0]), self._tiles(self.shape[1])
        if rows * cols >= BAND_TILES // 2:  # bands within an image
            bands = min(rows, max(-(-rows // self._most_band()), -(-threads // n)))
            return -(-rows // bands)
        rows *= n
        bands = -(-rows // self._most_band())
        bands = min(rows, -(-bands // threads) * threads)
        return -(-rows // bands)

    def tile_floats(self) -> int:
        products, cop = self.u.shape[0], self.bias.size
        tiles = self._most_band() * self._tiles(self.shape[1])
        floats = products * (tiles * (self.u.size // (products * cop) + cop) + 32)
        return floats + winograd.EDGE_FLOATS

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        x = program.pad(self, x)
        band = self._band(program.n, program.threads)
        # ranges of channels only while there are fewer bands of tiles than threads: each range
        # repeats its band's input transform (which at one image cost F(4x4, 3x3) on 16x16
        # outputs a third of its time)
        bands = -(-program.n * self._tiles(self.shape[0]) // band)
        ways = splits(bands, self.bias.size // 16, program.threads, per_thread=1)
        program.add(
            winograd.conv_wino,
            x,
            self.u,
            self.bias,
            program.tiles,
            out,
            self.act,
            self.pool,
            self.average,
            ways,
            self.size,
            program.at,
            band,
            self.views,
            program.turn,
        )
        return out


@dataclass(kw_only=True)
class PixelsPoolConv(Step):
    """`first_layer.conv1_pixels_pool2`: 1 input channel, at most 8 filters, 2x2/2 max or
    average pool."""

    wt: np.ndarray
    bias: np.ndarray
    window: tuple[int, int]
    act: int
    average: bool

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        x = program.pad(self, x)
        program.add(
            first_layer.conv1_pixels_pool2,
            x,
            self.wt,
            self.bias,
            program.tiles,
            out,
            *self.window,
            self.act,
            self.average,
        )
        return out


@dataclass(kw_only=True)
class K3PoolConv(Step):
    """`first_layer.conv1_k3_pool2`: 1 input channel, 3x3, filters a multiple of 16, 2x2/2 max
    pool; pads and preprocesses on the fly."""

    wb: np.ndarray
    pt: int
    pl: int
    act: int

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        ways = splits(program.n * self.shape[0], self.wb.shape[0], program.threads)
        program.add(
            first_layer.conv1_k3_pool2,
            x,
            self.wb,
            *program.scale_shift,
            out,
            self.pt,
            self.pl,
            self.act,
            ways,
        )
        return out


# -- the layer ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Conv2D(Layer):
    type: ClassVar[str] = "conv2d"
    KEYS: ClassVar[frozenset[str]] = frozenset(
        {"filters", "kernel_size", "strides", "padding", "activation", "use_bias"}
    )

    filters: int = 0
    kernel_size: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    padding: str = "valid"
    pads: tuple[int, int, int, int] = NO_PADS
    activation: str = "linear"
    use_bias: bool = True

    @classmethod
    def from_config(cls, raw, in_shape, where, **common):
        base.image_input(in_shape, where)
        if "filters" not in raw or "kernel_size" not in raw:
            raise base.fail(where, "'filters' and 'kernel_size' are required")
        window = base.pair(raw["kernel_size"], where, "kernel_size")
        strides = base.pair(raw.get("strides", 1), where, "strides")
        padding = base.choice(raw.get("padding", "valid"), where, "padding", PADDINGS)
        out_h, out_w, pads = base.window_geometry(in_shape, window, strides, padding, where)
        filters = base.integer(raw["filters"], where, "filters")
        return cls(
            **common,
            output_shape=(out_h, out_w, filters),
            filters=filters,
            kernel_size=window,
            strides=strides,
            padding=padding,
            pads=pads,
            activation=base.activation(raw, where),
            use_bias=base.use_bias(raw, where),
        )

    def describe(self) -> str:
        kh, kw = self.kernel_size
        return f"{kh}x{kw}/{self.strides[0]} {self.padding} {self.activation}"

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        prefix = f"layers.{self.index}"
        shapes = {f"{prefix}.kernel": (*self.kernel_size, self.input_shape[2], self.filters)}
        if self.use_bias:
            shapes[f"{prefix}.bias"] = (self.filters,)
        return shapes

    def first_layer_special(self, pool: Layer) -> bool:
        """1 input channel, 3x3 stride 1, then a 2x2/2 valid max pool: the first-layer kernels
        (inference and training) apply."""
        return (
            self.input_shape[2] == 1
            and self.kernel_size == (3, 3)
            and self.strides == (1, 1)
            and isinstance(pool, MaxPooling2D)
            and pool.pool_size == (2, 2)
            and pool.tiles_input
        )

    # -- inference ----------------------------------------------------------------------------
    def _fuses_pool(self, block) -> bool:
        """The block's pool (max or average) is a 2x2/2 pool that tiles the conv output: the kernels
        fuse it."""
        pool = block.pool
        return pool is not None and pool.pool_size == (2, 2) and pool.tiles_input

    def _pool_reads(self, pool) -> tuple[int, int]:
        """The rows and columns of conv output that the pool after this conv reads (all but
        the last ones its windows do not reach)."""
        oh, ow = self.output_shape[:2]
        ph, pw = pool.pool_size
        (sh, sw), (pt, _, pl, _) = pool.strides, pool.pads
        out_h, out_w = pool.output_shape[:2]
        return min(oh, (out_h - 1) * sh - pt + ph), min(ow, (out_w - 1) * sw - pl + pw)

    def _narrow_pays(self, block) -> bool:
        """Whether `direct_narrow` may beat `direct`: 64 filters or more, and a row of conv
        pixels that 64-channel blocks (at most 6 pixels a call) cover less well than 32-channel
        ones (7-8 a call and at least 2 more: each weight read once per 7-8 pixels instead of
        4-6). Measured on AMD Zen 5:
        1.09-1.42x faster on rows of 8, 14 and 16 pixels over 64 input channels, 0.91-0.96x on
        rows of 28 and 32 pixels over 32 (whose weights stay in L1 either way): the planner
        decides."""
        row = self._pool_reads(block.pool)[1] if block.pool else self.output_shape[1]
        narrow = gemm._block_rows(row, 8)  # pixels a call with 32-channel blocks
        wide = gemm._block_rows(row, 6)  # with 64-channel blocks
        return self.filters >= 64 and narrow >= 7 and narrow >= wide + 2

    def _patches_pay(self, block) -> bool:
        """Whether `patches` may beat `direct`: no pool after the conv (it fuses none), and
        conv rows shorter than a micro-kernel block (`gemm.PEAK_BLOCK`: 6 pixels), which
        `direct` covers with short calls that read each weight for few pixels. On an Intel Xeon
        (AVX-512), a 5x5/2 conv of 64 -> 128 channels with 4-pixel rows took 0.80-0.89x the
        time of `direct` at 8 and 32 images (0.96-1.10x at one); one with 8-pixel rows
        (3x3/2, 64 -> 128) took 1.07-1.08x at 32 images, so it is not offered there."""
        k = self.kernel_size[0] * self.kernel_size[1] * self.input_shape[2]
        small = 4 * direct.PATCH_GROUP * k <= PATCH_MAX_BYTES
        return block.pool is None and self.output_shape[1] < gemm.PEAK_BLOCK[0] and small

    def inference_variants(self, block) -> tuple[str, ...]:
        """`winograd` (3x3 stride 1) and `winograd5` (5x5 stride 1), the heuristic's choice from
        WINO_MIN_CHANNELS input channels on (`winograd` is offered for fewer too; `winograd5`
        after `winograd4_split` up to FIVE_SPLIT_MAX_BYTES); `k3_pool` and
        `pixels_pool` (1 input channel, fused 2x2/2 max pool; also average for `pixels_pool`),
        `direct` (every shape); `direct_narrow` (where `direct` is the heuristic's choice; see
        `_narrow_pays`); `patches` (short conv rows, no pool; see `_patches_pay`); `winograd4`
        (3x3 stride 1, from WINO_MIN_CHANNELS input channels on); `winograd4_phases` (stride
        2, kernels of 4-6 a side; the heuristic's choice from 16 input channels on);
        `winograd4_split` (stride 1, kernels other than 3x3 that it multiplies clearly less
        than direct, `_split_pays`; the heuristic's choice for 4x4 and larger from
        WINO_MIN_CHANNELS input channels on, for 5x5 up to a transformed kernel of
        FIVE_SPLIT_MAX_BYTES); `winograd_phases` (where `winograd4_phases` is the heuristic's
        choice)."""
        ci, filters = self.input_shape[2], self.filters
        three = self.kernel_size == (3, 3) and self.strides == (1, 1)
        # one input channel, stride 1, a fused 2x2/2 pool: the first-layer kernels
        one_channel_pool = self._fuses_pool(block) and ci == 1 and self.strides == (1, 1)
        max_pool = isinstance(block.pool, MaxPooling2D)
        five = self.kernel_size == (5, 5) and self.strides == (1, 1)
        wide = ci >= WINO_MIN_CHANNELS
        # a stride-2 kernel of 4-6 a side is a 3x3 one over the input's 2x2 phases: 9 taps
        # over 4 * CI channels, and F(4x4, 3x3) cuts its 16-36 multiplies per output and
        # channel to 9. Against direct on Zen 3 (32x32 inputs, 32 filters, 1 and 8 images):
        # 4x4/2 0.65-0.81x the time over 16 channels, 1.4-1.7x over 4 and 8; 5x5/2 0.50-0.69x
        # over 16, 0.86-1.0x over 4 and 8; F(2x2, 3x3) was slower than F(4x4, 3x3) on all.
        halves = self.strides == (2, 2) and all(4 <= k <= 6 for k in self.kernel_size)
        names = ["winograd"] if three and wide else []
        # a stride-1 kernel of 4x4 or more in 3x3 blocks (`split_views`): the heuristic's choice
        # from WINO_MIN_CHANNELS on. Against direct on Zen 3 (1, 8, 64 images, one process):
        # 7x7 over 8 and 32 channels 0.52-0.90x the time, 6x6 over 32 0.33-0.43x, 4x4 over 16
        # and 32 0.75-0.87x; 4x4 over 3 channels 1.07-1.12x, 5x5 over 3 and 6 1.14-1.45x, 2x2
        # over 32-64 0.89-1.21x (offered to the planner only). 5x5: see FIVE_SPLIT_MAX_BYTES.
        split = self._split_pays()
        split_first = split and wide and self.kernel_size[0] * self.kernel_size[1] >= 16
        if five and split_first:
            split_first = 4 * self._split_floats() <= FIVE_SPLIT_MAX_BYTES
        if split_first:
            names.append("winograd4_split")
        if halves and ci >= 16:
            names.append("winograd4_phases")
        # F(2x2, 5x5) measured faster than direct on 32-channel layers, far slower on 1-3 channels
        if five and wide:
            names.append("winograd5")
        if one_channel_pool and max_pool and self.kernel_size == (3, 3) and filters % 16 == 0:
            names.append("k3_pool")
        if one_channel_pool and filters <= 8:  # max or average pool
            names.append("pixels_pool")
        names.append("direct")
        if names == ["direct"] and self._narrow_pays(block):  # (else a faster kernel applies)
            names.append("direct_narrow")
        if self._patches_pay(block):
            names.append("patches")
        if three and not wide:
            names.append("winograd")
        if three and wide:  # narrower, F(4x4, 3x3) measured slower than direct
            names.append("winograd4")
        if halves and ci < 16:
            names.append("winograd4_phases")
        if split and not split_first:
            names.append("winograd4_split")
        if halves and ci >= 16:  # fewer transformed weights read per tile at few tiles
            names.append("winograd_phases")
        return tuple(names)

    def _split_floats(self) -> int:
        """The floats of `winograd4_split`'s transformed kernel: 36 per channel pair and block."""
        gh, gw = split_views(self.kernel_size)[:2]
        return 36 * gh * gw * self.input_shape[2] * round_up(self.filters, 16)

    def _split_pays(self) -> bool:
        """Whether `winograd4_split` applies and multiplies clearly less than direct: a stride-1
        kernel other than 3x3 (`winograd`, `winograd4`) in gh x gw blocks of 3x3, F(4x4, 3x3)
        doing 36/16 multiplies per output and channel of a block, under 3/4 of direct's kh*kw
        (2x2, 4x4, 5x5, 6x6, 7x7, 3x7: yes; 1x7: 6.75 against 7, no), with its transformed
        kernel within SPLIT_MAX_BYTES."""
        kh, kw = self.kernel_size
        if self.strides != (1, 1) or (kh, kw) == (3, 3):
            return False
        gh, gw = split_views(self.kernel_size)[:2]
        return 36 * gh * gw / 16 < 0.75 * kh * kw and 4 * self._split_floats() <= SPLIT_MAX_BYTES

    def inference_steps(self, block, weights, first, variant=None):
        variant = variant or self.inference_variants(block)[0]
        if variant not in self.inference_variants(block):
            raise ValueError(f"{self.label}: no kernel variant {variant!r} for this shape")
        act = CODES[block.activation]
        kernel = self.tensor(weights, "kernel")
        wk, bias = pack_gemm(kernel, self.tensor(weights, "bias"))
        pool = block.pool
        fused = self._fuses_pool(block)
        average = isinstance(pool, AveragePooling2D)
        shape = pool.output_shape if fused else self.output_shape
        kernel_act = LINEAR if act == SOFTMAX else act  # softmax runs as its own step
        common: dict[str, Any] = {"shape": shape, "takes_raw": first}

        def padding_for(rows_cols: tuple[int, int]) -> Padding:
            return Padding.for_output(
                self.input_shape, rows_cols, self.kernel_size, self.strides, self.pads
            )

        pooled_rows_cols = (2 * shape[0], 2 * shape[1])  # the conv pixels a fused pool reads
        filters = self.filters
        if variant in WINOGRAD:
            m = WINOGRAD[variant].m
            per = m // 2 if fused else m  # output pixels per tile side
            scale = 2 if fused else 1  # the conv pixels a pooled output reads
            rows_cols = (scale * round_up(shape[0], per), scale * round_up(shape[1], per))
            views, padded = tile_views(variant, self.kernel_size), padding_for(rows_cols)
            if views != PLAIN:  # a 3x3 conv over the input's views
                kernel = view_kernel(kernel, views)
                padded = Padding.for_output(
                    self.input_shape, rows_cols, view_window(views), self.strides, self.pads
                )
            step: Step = WinogradConv(
                **common,
                padding=padded,
                views=views,
                u=winograd_kernel(kernel, bias.size, WINOGRAD[variant]),
                bias=bias,
                act=kernel_act,
                pool=fused,
                average=average,
                size=m,
            )
        elif variant == "k3_pool":
            step = K3PoolConv(
                **common, wb=channel_blocks(kernel, bias), pt=self.pads[0], pl=self.pads[2], act=act
            )
        elif variant == "pixels_pool":
            kh, kw = self.kernel_size
            wt = np.zeros((8, kh * kw), np.float32)
            wt[:filters] = kernel.reshape(kh * kw, filters).T
            p = padding_for(pooled_rows_cols)
            # its 32-pixel blocks read past the last column
            width = max(p.shape[1], (pooled_rows_cols[1] + 31) // 32 * 32 + kw - 1)
            p = Padding((p.shape[0], width, p.shape[2]), p.pt, p.pl, True)
            step = PixelsPoolConv(
                **common,
                padding=p,
                wt=wt,
                bias=bias,
                window=self.kernel_size,
                act=act,
                average=average,
            )
        else:
            geometry: tuple[int, ...] | None = None  # of a fused pool (`DirectConv.pool`)
            rows_cols = self.output_shape[:2]
            if pool is not None:  # fused whatever its shape
                rows_cols = self._pool_reads(pool)
                geometry = (*pool.pool_size, *pool.strides, pool.pads[0], pool.pads[2])
                geometry += rows_cols
                common["shape"] = pool.output_shape
                fused = True
            step = DirectConv(
                **common,
                padding=padding_for(rows_cols),
                wk=wk,
                bias=bias,
                window=self.kernel_size,
                strides=self.strides,
                act=kernel_act,
                pool=geometry,
                average=average,
                narrow=variant == "direct_narrow",
                patches=variant == "patches",
            )
        steps = [step]
        if act == SOFTMAX:
            steps.append(Activate(act=SOFTMAX, width=filters))
        if pool is not None and not fused:
            steps.append(pool.step())
        return steps

    # -- training -----------------------------------------------------------------------------
    def train_param_shapes(self) -> dict[str, tuple[int, ...]]:
        kh, kw = self.kernel_size
        shapes = {"kernel": (self.filters, kh * kw * self.input_shape[2])}
        if self.use_bias:
            shapes["bias"] = (self.filters,)
        return shapes

    def to_file_layout(self, short, value):
        if short != "kernel":
            return value
        return value.T.reshape(*self.kernel_size, self.input_shape[2], self.filters)

    def from_file_layout(self, short, value):
        return value.reshape(-1, self.filters).T if short == "kernel" else value

    def fans(self) -> tuple[int, int]:
        field = self.kernel_size[0] * self.kernel_size[1]
        return field * self.input_shape[2], field * self.filters

    def _geometry(self) -> tuple[int, ...]:
        return (*self.kernel_size, *self.strides, self.pads[0], self.pads[2])

    def _kernel_layouts(self, bound) -> tuple[np.ndarray, np.ndarray, bool]:
        """(wd, wt, small): the kernel (CO, K), its transpose (K, CO) when the reduction is
        short enough for the outer-product form (`small`), else wd again."""
        wd = bound.params["kernel"]
        small = wd.shape[1] <= bound.SMALL_K
        return wd, (np.ascontiguousarray(wd.T) if small else wd), small

    def _weight_grads(self, bound, dw_part, db_part, small: bool) -> None:
        """Sum the per-chunk partials (transposed with `small`) into the gradients, in order."""
        if small:
            bound.grads["kernel"][:] = dw_part.sum(axis=0).T  # fixed order: numpy's pairwise sum
        else:
            K.sum_partials(dw_part.reshape(K.NCHUNKS, -1), bound.grads["kernel"].reshape(-1))
        if self.use_bias:
            K.sum_partials(db_part, bound.grads["bias"])

    def _partials(self, wd, x, need_dx, small):
        """Buffers for a backward pass: dx, weight and bias partials per chunk."""
        dw_shape = wd.shape[::-1] if small else wd.shape
        dx = np.empty_like(x) if need_dx else np.empty((1, 1, 1, 1), x.dtype)
        return (
            dx,
            np.empty((K.NCHUNKS, *dw_shape), wd.dtype),
            np.empty((K.NCHUNKS, wd.shape[0]), wd.dtype),
        )

    def forward(self, bound, x, rng):
        out = np.empty((x.shape[0], *self.output_shape), x.dtype)
        wd, wt, small = self._kernel_layouts(bound)
        relu = bound.act == RELU
        bias = bound.bias(x.dtype, self.filters)
        K.conv2d_forward(x, wd, wt, bias, out, *self._geometry(), relu, small)
        return activate(out, bound.act, relu_done=True), (x, out)

    def backward(self, bound, dout, cache, need_dx):
        x, y = cache
        dz = np.ascontiguousarray(activation_grad(dout, y, bound.act))
        wd, wt, small = self._kernel_layouts(bound)
        dx, dw_part, db_part = self._partials(wd, x, need_dx, small)
        K.conv2d_backward(
            x, wt if small else wd, dz, dx, dw_part, db_part, *self._geometry(), need_dx, small
        )
        self._weight_grads(bound, dw_part, db_part, small)
        return dx if need_dx else None

    @staticmethod
    def trains_fused_with(bound, pool: MaxPooling2D, forward: bool) -> bool:
        """Whether the fused training kernels run this conv with the max pool after it: the
        activation must be linear or ReLU, and the forward kernel needs windows that tile."""
        return bound.act in (LINEAR, RELU) and (pool.tiles_input or not forward)

    def forward_pooled(self, bound, x, pool: MaxPooling2D):
        """Forward of this conv (+ReLU) and the max pool after it: (pooled, (conv cache, pool cache))."""
        pooled = np.empty((x.shape[0], *pool.output_shape), x.dtype)
        arg = np.empty(pooled.shape, np.int32)
        wd, wt, small = self._kernel_layouts(bound)
        bias = bound.bias(x.dtype, self.filters)
        relu = bound.act == RELU
        if small and self.first_layer_special(pool):
            K.conv3x3c1_pool2_forward(
                x, wt, bias, pooled, arg, self.output_shape[1], self.pads[0], self.pads[2], relu
            )
        else:
            K.conv2d_pool_forward(
                x,
                wd,
                wt,
                bias,
                pooled,
                arg,
                *self.output_shape[:2],
                *self._geometry(),
                *pool.pool_size,
                relu,
                small,
            )
        return pooled, ((x, None), (x.shape[:1] + self.output_shape, arg, pooled))

    def backward_pooled(self, bound, dpool, cache, pool: MaxPooling2D, need_dx):
        """Backward through this conv (+ReLU) and the max pool after it, in one sparse pass."""
        (x, _), (_, arg, pooled) = cache
        oh, ow = self.output_shape[:2]
        wd, wt, small = self._kernel_layouts(bound)
        relu = bound.act == RELU
        dx, dw_part, db_part = self._partials(wd, x, need_dx, small)
        dpool = np.ascontiguousarray(dpool)
        if small and not need_dx and self.first_layer_special(pool):
            K.conv3x3c1_pool2_backward(
                x, pooled, dpool, arg, dw_part, db_part, ow, self.pads[0], self.pads[2], relu
            )
        else:
            pool_geometry = (*pool.pool_size, *pool.strides, pool.pads[0], pool.pads[2])
            buffers = (dx, dw_part, db_part)
            w = wt if small else wd
            K.conv2d_pool_backward(
                x,
                w,
                pooled,
                oh,
                ow,
                dpool,
                arg,
                *buffers,
                *self._geometry(),
                *pool_geometry,
                relu,
                need_dx,
                small,
            )
        self._weight_grads(bound, dw_part, db_part, small)
        return dx if need_dx else None

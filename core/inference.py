"""Forward execution of a validated architecture with the Numba kernels of `core/kernels/`.

`InferencePlan` turns the layer list into steps once: weights are packed for the kernels, fusable
patterns are merged (conv + 2x2/2 max pool, a standalone activation into the layer before it,
the model's preprocessing into the first convolution),
dropout and flatten cost nothing (flatten is a view: NHWC is already H, W, C order). Batches
above BATCH_CHUNK images run in chunks; one set of activation buffers, sized for the largest
chunk seen, is reused by every call, which allocates only its result.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.architecture import Architecture, LayerSpec
from convserve.core.kernels import dense as kdense
from convserve.core.kernels import direct, elementwise, first_layer, padding, winograd
from convserve.core.kernels import pool as kpool

ACT_CODES = {"linear": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "softmax": 4}
_MONOTONIC = (0, 1, 2, 3)
BATCH_CHUNK = 32  # larger batches run through the network in chunks of this many images
# Up to this batch size, choose between 1 and all threads by measured speed. Off (0) unless
# CONVSERVE_ADAPTIVE_THREADS=1: on a quiet machine two threads win (batch 8: about 9,000-10,000
# img/s against 5,600 on one), and the chooser's exploration calls, which find the other
# threads asleep, made it settle on one thread. It helps on busy, shared hosts.
SERIAL_MAX_WORK = 32768  # multiply-adds (or copied values) below which a step runs on the calling
# thread: a parallel region costs a few microseconds to start and join
DENSE_SERIAL_MAX_WORK = (
    4 * SERIAL_MAX_WORK
)  # the same for dense layers, whose weights stream from cache
ADAPT_MAX_BATCH = 8 if os.environ.get("CONVSERVE_ADAPTIVE_THREADS") == "1" else 0


class ThreadChooser:
    """Picks 1 thread or all of them for small batches, whichever has been faster lately.

    On a quiet machine two threads win even at batch 1; on a busy, shared one a parallel region
    waits whenever one of its threads is descheduled, and a single thread is faster and far
    steadier. Each batch size keeps a moving average of call time per choice, takes the better
    one, and retries the other every `explore` calls (every 8 * `explore` when it is more than
    1.5x slower) so that it notices when the load changes."""

    def __init__(self, explore: int = 16, alpha: float = 0.1):
        self.explore, self.alpha = explore, alpha
        self._avg: dict[tuple[int, int], float] = {}
        self._calls: dict[int, int] = {}

    def choose(self, n: int, threads: int) -> int:
        options = (threads, 1)
        calls = self._calls[n] = self._calls.get(n, 0) + 1
        unknown = [k for k in options if (n, k) not in self._avg]
        if unknown:
            return unknown[0]
        best = min(options, key=lambda k: self._avg[(n, k)])
        other = options[1] if best == options[0] else options[0]
        # retry the other setting every `explore` calls, 8 times less often when it is far behind
        far = self._avg[(n, other)] > 1.5 * self._avg[(n, best)]
        if calls % (self.explore * (8 if far else 1)) == 0:
            return other
        return best

    def record(self, n: int, threads: int, seconds: float) -> None:
        key = (n, threads)
        old = self._avg.get(key)
        self._avg[key] = seconds if old is None else old + self.alpha * (seconds - old)


_INPUT = object()  # placeholders in a prepared program: the call's input and its result
_RESULT = object()


def _thread_count_reader() -> Any:
    """A function returning numba's thread count for the calling thread: numba's own ctypes
    reader once the threading layer runs (0.1 us; `numba.get_num_threads` takes a lock and
    costs 0.7 us, twice per forward pass), else `numba.get_num_threads` itself."""
    numba.get_num_threads()  # starts the threading layer
    try:
        from numba.np.ufunc import parallel

        reader = getattr(parallel, "_get_num_threads", None)
        if callable(reader) and reader() == numba.get_num_threads():
            return reader
    except Exception:  # pragma: no cover - a numba without this private reader
        pass
    return numba.get_num_threads


def bind_args(call: tuple[Any, tuple, int, int], x: np.ndarray, result: np.ndarray | None) -> Any:
    """The arguments of a prepared call (kernel, args, input position, result position) with
    this call's input and result in place of the placeholders."""
    _, args, in_pos, res_pos = call
    if in_pos < 0 and res_pos < 0:
        return args
    args = list(args)
    if in_pos >= 0:
        args[in_pos] = x
    if res_pos >= 0:
        args[res_pos] = result
    return args


def _entry_point(dispatcher: Any, args: Any) -> Any:
    """The compiled function a numba dispatcher runs for `args`, callable directly: it skips
    the dispatcher's type resolution (about 0.2 us of the 0.4 us a call costs). The dispatcher
    itself when the signature cannot be found."""
    try:
        return dispatcher.overloads[tuple(numba.typeof(a) for a in args)].entry_point
    except (AttributeError, KeyError, TypeError, ValueError):
        return dispatcher


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _splits(tasks: int, groups: int, threads: int) -> int:
    """How many ways to split a task (its output channels or columns, at most `groups` ways) so
    that small batches still feed every thread."""
    splits = 1
    while tasks * splits < 4 * threads and splits * 2 <= groups:
        splits *= 2
    return splits


def _pad_kernel(n: int, step: _Step) -> Any:
    """The padding copy of a conv step's input: serial for small inputs."""
    h, w, c = step.params["padded"]
    return padding.pad_input_serial if n * h * w * c < SERIAL_MAX_WORK else padding.pad_input


@dataclass
class _Step:
    """One kernel call: `kind` selects it; `shape` is the per-image output shape (None: in place)."""

    kind: str
    shape: tuple[int, ...] | None
    params: dict[str, Any] = field(default_factory=dict)
    takes_raw: bool = False  # applies the model's preprocessing itself


def _pack_conv(layer: LayerSpec, kernel: np.ndarray, bias: np.ndarray | None) -> dict[str, Any]:
    kh, kw, ci, co = kernel.shape
    k = kh * kw * ci
    wk = np.zeros((k, _round_up(co, 16)), np.float32)
    wk[:k, :co] = kernel.reshape(k, co)
    b = np.zeros(wk.shape[1], np.float32)
    if bias is not None:
        b[:co] = bias
    return {
        "wk": wk,
        "bias": b,
        "kh": kh,
        "kw": kw,
        "sh": layer.strides[0],
        "sw": layer.strides[1],
        "pt": layer.pads[0],
        "pl": layer.pads[2],
    }


_WINO_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
WINO_MIN_CHANNELS = 8  # below this many input channels a GEMM over them is too short to pay
# CONVSERVE_WINOGRAD=0 runs 3x3 layers on the direct kernels (for comparison and diagnosis)
WINOGRAD = os.environ.get("CONVSERVE_WINOGRAD", "1") != "0"


def _winograd_kernel(kernel: np.ndarray, cop: int) -> np.ndarray:
    """The F(2x2, 3x3) transformed kernel G g G^T as (16, CI, COp), computed in float64."""
    _, _, ci, co = kernel.shape
    u = np.einsum("ia,abcd,jb->ijcd", _WINO_G, kernel.astype(np.float64), _WINO_G)
    out = np.zeros((16, ci, cop), np.float32)
    out[:, :, :co] = u.reshape(16, ci, co)
    return out


def _winograd_fits(layer: LayerSpec) -> bool:
    return (
        WINOGRAD
        and layer.kernel_size == (3, 3)
        and layer.strides == (1, 1)
        and layer.input_shape[2] >= WINO_MIN_CHANNELS
    )


def _channel_blocks(kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Pack a conv kernel for the channel-vector kernels: (ceil(CO/16), taps + 1, 16), per block
    of 16 output channels the taps in (ky, kx, ci) order then the bias, zero padded."""
    co = kernel.shape[-1]
    nb = (co + 15) // 16
    taps = np.zeros((kernel.size // co + 1, nb * 16), np.float32)
    taps[:-1, :co] = kernel.reshape(-1, co)
    taps[-1, :co] = bias[:co]
    return np.ascontiguousarray(taps.reshape(-1, nb, 16).transpose(1, 0, 2))


def _pack_dense(kernel: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The weights for `kdense.dense`: units rounded up to 16 (zero columns), in blocks of 64
    units, each block's K rows contiguous; flat. And the bias padded the same way."""
    k, units = kernel.shape
    up = _round_up(units, 16)
    padded = np.zeros((k, up), np.float32)
    padded[:, :units] = kernel
    wk = np.concatenate([padded[:, c : c + 64].ravel() for c in range(0, up, 64)])
    b = np.zeros(up, np.float32)
    if bias is not None:
        b[:units] = bias
    return wk, b


def _add_padding(
    p: dict[str, Any], input_shape: tuple[int, ...], rows_cols: tuple[int, int]
) -> None:
    """The conv kernels read a 'valid' input: record the zero-padded input shape `padded` that
    computing `rows_cols` output pixels needs, and whether the input must be copied into it."""
    h, w, c = input_shape
    hp = (rows_cols[0] - 1) * p["sh"] + p["kh"]
    wp = (rows_cols[1] - 1) * p["sw"] + p["kw"]
    p["padded"] = (hp, wp, c)
    p["needs_pad"] = p["pt"] > 0 or p["pl"] > 0 or hp > p["pt"] + h or wp > p["pl"] + w


def _fusable_pool(layer: LayerSpec | None) -> bool:
    return (
        layer is not None
        and layer.type == "max_pooling2d"
        and layer.pool_size == (2, 2)
        and layer.strides == (2, 2)
        and layer.padding == "valid"
    )


def build_steps(arch: Architecture, weights: dict[str, np.ndarray]) -> list[_Step]:
    """Compile the layer list into kernel steps (packing weights, fusing known patterns)."""
    layers = [l for l in arch.layers if l.type != "dropout"]
    steps: list[_Step] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        prefix = f"layers.{layer.index}"
        if layer.type == "conv2d":
            act = ACT_CODES[layer.activation]
            # a standalone activation right after a linear conv becomes the conv's activation
            if (
                act == 0
                and nxt is not None
                and nxt.type == "activation"
                and nxt.activation != "softmax"
            ):
                act = ACT_CODES[nxt.activation]
                i += 1
                nxt = layers[i + 1] if i + 1 < len(layers) else None
            p = _pack_conv(layer, weights[f"{prefix}.kernel"], weights.get(f"{prefix}.bias"))
            first = not steps
            fuse = (
                act in _MONOTONIC
                and _fusable_pool(nxt)
                and layer.output_shape[0] >= 2
                and layer.output_shape[1] >= 2
            )
            ci, (kh, kw), kernel = (
                layer.input_shape[2],
                layer.kernel_size,
                weights[f"{prefix}.kernel"],
            )
            if _winograd_fits(layer):
                p["u"] = _winograd_kernel(kernel, p["wk"].shape[1])
                if fuse:
                    shape, rows_cols = (
                        nxt.output_shape,
                        (2 * nxt.output_shape[0], 2 * nxt.output_shape[1]),
                    )
                else:
                    shape = layer.output_shape
                    rows_cols = (_round_up(shape[0], 2), _round_up(shape[1], 2))
                _add_padding(p, layer.input_shape, rows_cols)
                p.update(act=0 if act == 4 else act, pool=fuse)
                steps.append(_Step("conv_wino", shape, p, takes_raw=first))
                if act == 4:
                    steps.append(_Step("activate", None, {"act": 4, "width": layer.filters}))
                i += 2 if fuse else 1
                continue
            if fuse:
                kind = "conv_pool2"
                if (
                    ci == 1
                    and layer.strides == (1, 1)
                    and (kh, kw) == (3, 3)
                    and layer.filters % 16 == 0
                ):
                    kind, p["wb"] = "conv1_k3_pool2", _channel_blocks(kernel, p["bias"])
                elif ci == 1 and layer.strides == (1, 1) and layer.filters <= 8:
                    kind = "conv1_pixels_pool2"
                    p["wt"] = np.zeros((8, kh * kw), np.float32)
                    p["wt"][: layer.filters] = kernel.reshape(kh * kw, layer.filters).T
                if kind != "conv1_k3_pool2":  # only the conv rows and columns the pool keeps
                    rows, cols = 2 * nxt.output_shape[0], 2 * nxt.output_shape[1]
                    _add_padding(p, layer.input_shape, (rows, cols))
                if kind == "conv1_pixels_pool2":  # its 32-pixel blocks read past the last column
                    hp, wp, c = p["padded"]
                    p["padded"] = (hp, max(wp, (cols + 31) // 32 * 32 + kw - 1), c)
                    p["needs_pad"] = True
                steps.append(_Step(kind, nxt.output_shape, {**p, "act": act}, takes_raw=first))
                i += 2
                continue
            _add_padding(p, layer.input_shape, layer.output_shape[:2])
            steps.append(
                _Step(
                    "conv",
                    layer.output_shape,
                    {**p, "act": 0 if act == 4 else act},
                    takes_raw=first,
                )
            )
            if act == 4:
                steps.append(_Step("activate", None, {"act": 4, "width": layer.filters}))
            i += 1
            continue
        if not steps:  # the model's preprocessing, when no convolution comes first
            steps.append(_Step("preprocess", arch.input_shape, {}, takes_raw=True))
        if layer.type in ("max_pooling2d", "average_pooling2d"):
            steps.append(
                _Step(
                    "pool",
                    layer.output_shape,
                    {
                        "ph": layer.pool_size[0],
                        "pw": layer.pool_size[1],
                        "sh": layer.strides[0],
                        "sw": layer.strides[1],
                        "pt": layer.pads[0],
                        "pl": layer.pads[2],
                        "average": layer.type == "average_pooling2d",
                    },
                )
            )
        elif layer.type == "flatten":
            steps.append(_Step("flatten", layer.output_shape))
        elif layer.type == "dense":
            act = ACT_CODES[layer.activation]
            if act == 0 and nxt is not None and nxt.type == "activation":
                act = ACT_CODES[nxt.activation]
                i += 1
            wk, b = _pack_dense(weights[f"{prefix}.kernel"], weights.get(f"{prefix}.bias"))
            steps.append(_Step("dense", layer.output_shape, {"wk": wk, "bias": b, "act": act}))
        elif layer.type == "activation":
            width = layer.output_shape[-1]
            steps.append(
                _Step("activate", None, {"act": ACT_CODES[layer.activation], "width": width})
            )
        i += 1
    return steps


class InferencePlan:
    """Runs a model's layers on float32 NHWC batches. Safe to call from several threads
    (calls are serialized; the kernels themselves use every core and release the GIL)."""

    def __init__(self, architecture: Architecture, weights: dict[str, np.ndarray]):
        self.architecture = architecture
        self.weights = weights
        arch = architecture
        std = np.asarray(arch.std, np.float32)
        self.scale = (np.float32(arch.scale) / std).astype(np.float32)
        self.shift = (-np.asarray(arch.mean, np.float32) / std).astype(np.float32)
        # per-channel values repeated along an input row, for the padding copy's contiguous runs
        h, w, c = arch.input_shape
        self._row_scale, self._row_shift = np.tile(self.scale, w), np.tile(self.shift, w)
        self._identity = (np.ones(w * c, np.float32), np.zeros(w * c, np.float32))
        self.steps = build_steps(arch, weights)
        self.threads = numba.config.NUMBA_NUM_THREADS
        self._threads_now = _thread_count_reader()
        tile = 512  # per-thread conv output rows: two conv rows of a pooled row, one conv row, or 2x8x32
        for step in self.steps:
            if step.kind == "conv_pool2":
                tile = max(tile, 4 * step.shape[1] * step.params["wk"].shape[1])
            elif step.kind == "conv":
                tile = max(tile, step.shape[1] * step.params["wk"].shape[1])
            elif step.kind == "dense":
                tile = max(tile, kdense.DENSE_ROWS * step.params["bias"].size)
            elif step.kind == "conv_wino":
                tw = step.shape[1] if step.params["pool"] else (step.shape[1] + 1) // 2
                tile = max(tile, 16 * tw * sum(step.params["u"].shape[1:]))
        self._tiles = np.zeros((self.threads, tile), np.float32)
        self._capacity = 0  # batch size the activation buffers are allocated for
        self._buffers: list[np.ndarray | None] = []
        self._padded: dict[int, np.ndarray] = {}
        self._input: np.ndarray | None = None
        self._programs: dict[tuple[int, bool, int], Any] = {}
        self._chooser = ThreadChooser()
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------
    def run(self, x: np.ndarray, preprocess: bool = False) -> np.ndarray:
        """`x`: (N, H, W, C) batch, checked by the caller. With `preprocess=False` it is float32
        and already preprocessed; with `preprocess=True` it holds raw pixels (any real dtype) and
        the model's `(p * scale - mean) / std` is applied inside the first kernel.
        Returns a new float32 (N, outputs) array."""
        n = x.shape[0]
        with self._lock:
            if x.dtype != np.float32 or not x.flags.c_contiguous:
                if self._input is None or self._input.shape[0] < n:
                    self._input = np.empty(x.shape, np.float32)
                buf = self._input[:n]
                np.copyto(buf, x, casting="unsafe")
                x = buf
            return self._forward(x, preprocess)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Compile (or load from numba's cache) every kernel the model can need and allocate
        the buffers, by running each batch size once (plus 1, 8 and BATCH_CHUNK, which between
        them reach every kernel: small steps run serial versions)."""
        for n in sorted({1, 8, BATCH_CHUNK, *batch_sizes}):
            self.run(np.zeros((n, *self.architecture.input_shape), np.float32))
            self.run(np.zeros((n, *self.architecture.input_shape), np.float32), preprocess=True)

    # -- internals ------------------------------------------------------------------------
    def _buffers_for(self, n: int) -> list[np.ndarray | None]:
        """Activation buffers for a batch of n: views of one set sized for the largest batch
        seen so far (C-contiguous prefixes, so kernel signatures do not change)."""
        if n > self._capacity:
            bufs: list[np.ndarray | None] = []
            for k, step in enumerate(self.steps):
                last = k == len(self.steps) - 1
                if step.shape is None or step.kind == "flatten" or last:
                    bufs.append(None)
                else:
                    bufs.append(np.empty((n, *step.shape), np.float32))
            # zero-padded conv inputs: only their interior is ever written, the border stays zero
            self._padded = {
                k: np.zeros((n, *step.params["padded"]), np.float32)
                for k, step in enumerate(self.steps)
                if "padded" in step.params and (step.params["needs_pad"] or step.takes_raw)
            }
            self._buffers, self._capacity = bufs, n
            self._programs.clear()
        return [None if b is None else b[:n] for b in self._buffers]

    def _forward(self, x: np.ndarray, preprocess: bool) -> np.ndarray:
        n = x.shape[0]
        threads = self._threads_now()
        if n <= ADAPT_MAX_BATCH and threads > 1:
            use = self._chooser.choose(n, threads)
            if use != threads:
                numba.set_num_threads(use)  # per calling thread; restored below
            start = time.perf_counter()
            try:
                result = self._forward_chunk(x, preprocess, None)
            finally:
                if use != threads:
                    numba.set_num_threads(threads)
            self._chooser.record(n, use, time.perf_counter() - start)
            return result
        if n <= BATCH_CHUNK:
            return self._forward_chunk(x, preprocess, None)
        # large batches run in chunks, so that activations stay in cache between layers
        result = np.empty((n, self.architecture.num_outputs), np.float32)
        for start in range(0, n, BATCH_CHUNK):
            stop = min(n, start + BATCH_CHUNK)
            self._forward_chunk(x[start:stop], preprocess, result[start:stop])
        return result

    def _forward_chunk(
        self, x: np.ndarray, preprocess: bool, result: np.ndarray | None
    ) -> np.ndarray:
        n = x.shape[0]
        key = (n, preprocess, self._threads_now())
        program = self._programs.get(key)
        fresh = program is None
        if fresh:
            program = self._programs[key] = self._program(n, preprocess, key[2])
        calls, result_shape, final = program
        if result_shape is not None and result is None:
            result = np.empty(result_shape, np.float32)
        for k, call in enumerate(calls):
            args = bind_args(call, x, result)
            call[0](*args)
            if fresh:  # from now on call the compiled code this call picked
                calls[k] = (_entry_point(call[0], args), *call[1:])
        if result_shape is not None:
            return result
        if result is not None:  # the last step worked in place: copy out
            result[...] = final.reshape(n, -1)
            return result
        return final.reshape(n, -1).copy()

    def _program(self, n: int, preprocess: bool, threads: int):
        """The kernel calls of a batch of n as (kernel, args, input position, result position);
        `_INPUT` and `_RESULT` stand for the call's input and its freshly allocated result."""
        bufs = self._buffers_for(n)
        steps = self.steps
        count = len(steps)
        calls: list[tuple[Any, tuple, int, int]] = []

        def add(fn: Any, *args: Any) -> None:
            pos = [i for i, a in enumerate(args) if a is _INPUT]
            res = [i for i, a in enumerate(args) if a is _RESULT]
            calls.append((fn, args, pos[0] if pos else -1, res[0] if res else -1))

        x: Any = _INPUT
        result_shape = None
        k = 0
        while k < count:
            step = steps[k]
            p = step.params
            if step.shape is None:
                out = x
            elif k == count - 1:
                out, result_shape = _RESULT, (n, *step.shape)
            else:
                out = bufs[k]
            raw = step.takes_raw and preprocess
            sc, sf = (self._row_scale, self._row_shift) if raw else self._identity
            if step.kind in ("conv_pool2", "conv", "conv_wino") and (raw or p["needs_pad"]):
                padded = self._padded[k][:n]
                add(_pad_kernel(n, step), x, sc, sf, int(raw), padded, p["pt"], p["pl"])
                x = padded
            if step.kind in ("conv_pool2", "conv"):
                splits = _splits(n * step.shape[0], step.shape[1], threads)
                kernel = direct.conv_pool2 if step.kind == "conv_pool2" else direct.conv
                add(
                    kernel,
                    x,
                    p["wk"],
                    p["bias"],
                    self._tiles,
                    out,
                    p["kh"],
                    p["kw"],
                    p["sh"],
                    p["sw"],
                    p["act"],
                    splits,
                )
            elif step.kind == "conv_wino":
                rows = step.shape[0] if p["pool"] else (step.shape[0] + 1) // 2
                splits = _splits(n * rows, p["u"].shape[2] // 16, threads)
                add(
                    winograd.conv_wino,
                    x,
                    p["u"],
                    p["bias"],
                    self._tiles,
                    out,
                    p["act"],
                    p["pool"],
                    splits,
                )
            elif step.kind == "conv1_pixels_pool2":
                padded = self._padded[k][:n]
                add(_pad_kernel(n, step), x, sc, sf, int(raw), padded, p["pt"], p["pl"])
                add(
                    first_layer.conv1_pixels_pool2,
                    padded,
                    p["wt"],
                    p["bias"],
                    self._tiles,
                    out,
                    p["kh"],
                    p["kw"],
                    p["act"],
                )
            elif step.kind == "conv1_k3_pool2":
                splits = _splits(n * step.shape[0], p["wb"].shape[0], threads)
                add(
                    first_layer.conv1_k3_pool2,
                    x,
                    p["wb"],
                    sc,
                    sf,
                    out,
                    p["pt"],
                    p["pl"],
                    p["act"],
                    splits,
                )
            elif step.kind == "preprocess":
                add(
                    elementwise.preprocess,
                    x,
                    *((self.scale, self.shift) if raw else self._identity),
                    out,
                )
            elif step.kind == "pool":
                add(
                    kpool.pool2d,
                    x,
                    out,
                    p["ph"],
                    p["pw"],
                    p["sh"],
                    p["sw"],
                    p["pt"],
                    p["pl"],
                    p["average"],
                )
            elif step.kind == "flatten":
                out = x.reshape(n, -1)  # x is a buffer here: a preprocess step always comes first
            elif step.kind == "dense":
                if n * p["wk"].size < DENSE_SERIAL_MAX_WORK:
                    add(kdense.dense_serial, x, p["wk"], p["bias"], self._tiles, out, p["act"])
                else:
                    rows = (n + kdense.DENSE_ROWS - 1) // kdense.DENSE_ROWS
                    blocks = (p["bias"].size + 63) // 64
                    splits = 1 if p["act"] == 4 else _splits(rows, blocks, threads)
                    add(kdense.dense, x, p["wk"], p["bias"], self._tiles, out, p["act"], splits)
            elif step.kind == "activate":
                add(elementwise.activate, x.reshape(-1, p["width"]), p["act"])
            x = out
            k += 1
        return calls, result_shape, (None if x is _RESULT else x)

"""Dense (fully connected) layer: `act(x @ kernel + bias)` on a flat input."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from convserve.core import aligned
from convserve.core.activations import CODES, RELU, SOFTMAX
from convserve.core.kernels import dense as kdense
from convserve.core.layers import base
from convserve.core.layers.base import Layer
from convserve.core.steps import Program, Step
from convserve.core.threads import DENSE_SERIAL_MAX_WORK
from convserve.core.training import kernels as K
from convserve.core.training.layers import activate, activation_grad

_TASKS, _OUTPUT_AT = (kdense.CHAIN_COLUMNS.index(c) for c in ("tasks", "output_at"))


def round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def pack_dense(
    kernel: np.ndarray, bias: np.ndarray | None, block: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """The weights for `kdense.dense`, flat, and the bias padded to the units rounded up to
    16 (zeros). More than 16 units: units rounded up to 16 (zero columns), in blocks of
    `block` (64 or 16) units, each block's K rows contiguous. At most 16: the K rows of the
    units as they are, then 16 - units zeros, so a 16-float load of the last row stays inside.
    (A layer of 10 units then reads 40 bytes of weights per input instead of 64; at one image
    its weights come from L3, and the 16-unit kernel took 0.74-0.86x the time over 2,048-8,192
    inputs on an AMD Zen 3.)"""
    k, units = kernel.shape
    up = round_up(units, 16)
    b = np.zeros(up, np.float32)
    if bias is not None:
        b[:units] = bias
    if units <= 16:
        tail = np.zeros(16 - units, np.float32)
        return np.concatenate([np.ascontiguousarray(kernel, np.float32).ravel(), tail]), b
    padded = np.zeros((k, up), np.float32)
    padded[:, :units] = kernel
    wk = np.concatenate([padded[:, c : c + block].ravel() for c in range(0, up, block)])
    return wk, b


@dataclass(kw_only=True)
class DenseStep(Step):
    ROWS: ClassVar[bool] = True
    READS_INPUT_ONLY: ClassVar[bool] = True

    wk: np.ndarray
    bias: np.ndarray
    act: int
    k_pass: int  # inputs per pass over a block of weights (`kdense.K_CHUNK`); 0: one pass
    block: int  # units per block of packed weights: 64, or 16 (`strips`)

    def tile_floats(self) -> int:
        return kdense.tile_floats()

    def split(self, n: int, threads: int) -> tuple[int, int]:
        """(rows per task, parts per group of rows) of `kdense.dense` at n rows on `threads`
        threads (`kdense.dense_tasks`); (0, 1) where the layer runs on the calling thread alone
        (`kdense.dense_serial`): a parallel region costs a few microseconds, not worth it for
        little work, nor for one task."""
        blocks = (self.bias.size + 63) // 64
        rows, ways = kdense.dense_tasks(n, blocks, threads, self.act == SOFTMAX)
        if n * self.wk.size < DENSE_SERIAL_MAX_WORK or (rows >= n and ways == 1):
            return 0, 1
        return rows, ways

    def chain_row(
        self,
        n: int,
        split: tuple[int, int],
        starts: tuple[int, int] = (0, 0),
        claims_at: int = 1,
        output_at: int = 0,
    ) -> list[int]:
        """This layer's row of `kdense.dense_chain`'s table at n rows split as `split` says
        (`split`), its weights and bias at `starts` in the chain's arrays. A layer
        `kdense.dense_serial` would run goes as its groups of MAX_TASK_ROWS rows, one task each:
        the same micro-kernel calls, and no serial path for numba to compile into the chain
        kernel too (2.4 s more on an Intel Xeon)."""
        rows, ways = split if split[0] else (kdense.MAX_TASK_ROWS, 1)
        return kdense.chain_row(
            n, self.shape[0], self.wk.size, self.bias.size, self.act, self.k_pass, self.block,
            rows, ways, *starts, claims_at, output_at,
        )  # fmt: skip

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        """`kdense.dense_serial`, or `kdense.dense_chain` as a chain of this layer alone."""
        split = self.split(program.n, program.threads)
        if split[0] == 0:
            common = (x, self.wk, self.bias, program.tiles, out, self.act)
            program.add(kdense.dense_serial, *common, self.k_pass, self.block, program.turn)
            return out
        table = np.array([self.chain_row(program.n, split)], np.int64)
        counters = np.zeros(1 + table[0, _TASKS], np.int64)
        args = (x, self.wk, self.bias, kdense.NO_SCRATCH, out, table, program.tiles, counters)
        program.add(kdense.dense_chain, *args, program.threads, program.turn)
        return out


@dataclass(kw_only=True)
class DenseChainStep(Step):
    """Consecutive dense layers in one kernel call (`kdense.dense_chain`), each computed as its
    `DenseStep` would compute it alone, so with the same bits. `wk` and `bias` hold every
    layer's packed arrays one after another, each from a cache line (`starts`: where, in
    floats); the layers' own arrays are views of them."""

    ROWS: ClassVar[bool] = True
    READS_INPUT_ONLY: ClassVar[bool] = True

    layers: tuple[DenseStep, ...]
    wk: np.ndarray
    bias: np.ndarray
    starts: tuple[tuple[int, int], ...]  # per layer: its weights' and its bias's first float

    @classmethod
    def of(cls, layers: list[DenseStep]) -> DenseChainStep:
        """The chain of `layers` (in order, each reading the one before's output)."""
        starts, w_end, b_end = [], 0, 0
        for layer in layers:
            starts.append((w_end, b_end))
            w_end = round_up(w_end + layer.wk.size, 16)
            b_end = round_up(b_end + layer.bias.size, 16)
        wk, bias = aligned.zeros(w_end), aligned.zeros(b_end)
        views = []
        for layer, (w0, b0) in zip(layers, starts):
            w, b = wk[w0 : w0 + layer.wk.size], bias[b0 : b0 + layer.bias.size]
            w[...], b[...] = layer.wk.ravel(), layer.bias
            views.append(dataclasses.replace(layer, wk=w, bias=b))
        return cls(
            shape=layers[-1].shape, layers=tuple(views), wk=wk, bias=bias, starts=tuple(starts)
        )

    def tile_floats(self) -> int:
        return kdense.tile_floats()

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        n, rows = program.n, []
        splits = [layer.split(n, program.threads) for layer in self.layers]
        claims = len(self.layers)  # the counters: first a done count per layer
        scratch = 0  # floats of the layers' outputs before the last one's
        for layer, split, starts in zip(self.layers, splits, self.starts):
            rows.append(layer.chain_row(n, split, starts, claims, scratch))
            claims += rows[-1][_TASKS]
            scratch += round_up(n * layer.shape[0], 16)
        table = np.array(rows, np.int64)
        acts = self._activations(rows[-1][_OUTPUT_AT])  # the outputs before the last layer's
        if not any(rows_per_task for rows_per_task, _ in splits):
            # every layer on the calling thread: their own serial kernels one after another (a
            # serial chain kernel saved 0.4 us on lenet5's head at one image, and took numba
            # 4.5 s more to compile on a machine's first start)
            for k, layer in enumerate(self.layers):
                if k == len(self.layers) - 1:
                    return layer.emit(program, x, out)
                o, units = table[k, _OUTPUT_AT], layer.shape[0]
                x = layer.emit(program, x, acts[o : o + n * units].reshape(n, units))
        counters = np.zeros(claims, np.int64)
        args = (x, self.wk, self.bias, acts, out, table, program.tiles, counters)
        program.add(kdense.dense_chain, *args, program.threads, program.turn)
        return out

    def _activations(self, floats: int) -> np.ndarray:
        """Scratch for the outputs of the layers but the last: a view of one array, sized for
        the largest batch so far (an `InferencePlan` runs one batch at a time)."""
        floats = max(floats, 16)
        held = getattr(self, "_held", None)
        if held is None or held.size < floats:
            held = self._held = aligned.empty(floats)
        return held[:floats]


def chain_dense_steps(steps: list[Step]) -> list[Step]:
    """`steps` with every run of two or more consecutive `DenseStep`s as one `DenseChainStep`."""
    chained: list[Step] = []
    run: list[DenseStep] = []
    for step in [*steps, None]:
        if isinstance(step, DenseStep):
            run.append(step)
            continue
        chained += [DenseChainStep.of(run)] if len(run) > 1 else run
        run = []
        if step is not None:
            chained.append(step)
    return chained


@dataclass(frozen=True, kw_only=True)
class Dense(Layer):
    type: ClassVar[str] = "dense"
    KEYS: ClassVar[frozenset[str]] = frozenset({"units", "activation", "use_bias"})

    units: int = 0
    activation: str = "linear"
    use_bias: bool = True

    @classmethod
    def from_config(cls, raw, in_shape, where, **common):
        if len(in_shape) != 1:
            raise base.fail(
                where,
                f"needs a flat input (features,), got shape {list(in_shape)}; add a 'flatten' layer first",
            )
        if "units" not in raw:
            raise base.fail(where, "'units' is required")
        units = base.integer(raw["units"], where, "units")
        return cls(
            **common,
            output_shape=(units,),
            units=units,
            activation=base.activation(raw, where),
            use_bias=base.use_bias(raw, where),
        )

    def describe(self) -> str:
        return self.activation

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        prefix = f"layers.{self.index}"
        shapes = {f"{prefix}.kernel": (self.input_shape[0], self.units)}
        if self.use_bias:
            shapes[f"{prefix}.bias"] = (self.units,)
        return shapes

    # -- inference ----------------------------------------------------------------------------
    def inference_variants(self, block) -> tuple[str, ...]:
        """More than 16 units: weights in blocks of 64 units, with more than `kdense.K_CHUNK`
        inputs in `passes` (a task's rows go over each block K_CHUNK inputs at a time, so the
        block's part stays in L1; fastest on an Intel Xeon) or in `one_pass` (all inputs at once;
        5-13 % faster on AMD Zen 5 from 4 rows on); or `strips`: blocks of 16 units, one pass,
        the first choice with AVX2's 16 vector registers (`kdense._strip_rows`); with AVX-512,
        the one that reads each weight once at up to 8 rows (`kdense._strip_groups`). All give the
        same bits. At most 16 units have one kernel of their own (each output's sum in four
        chains)."""
        if self.units <= 16:  # one block of 16 units: its own kernel (`kdense._segmented_rows`)
            return ()
        wide = ("passes", "one_pass") if self.input_shape[0] > kdense.K_CHUNK else ("one_pass",)
        return (*wide, "strips") if kdense.WIDE else ("strips", *wide)

    def inference_steps(self, block, weights, first, variant=None):
        if variant not in (None, *self.inference_variants(block)):
            raise ValueError(f"{self.label}: no kernel variant {variant!r} for this shape")
        variant = variant or next(iter(self.inference_variants(block)), "one_pass")
        width = 16 if variant == "strips" else 64
        wk, b = pack_dense(self.tensor(weights, "kernel"), self.tensor(weights, "bias"), width)
        k_pass = kdense.K_CHUNK if variant == "passes" else 0
        act = CODES[block.activation]
        step = DenseStep(
            shape=self.output_shape, wk=wk, bias=b, act=act, k_pass=k_pass, block=width
        )
        return [step]

    # -- training -----------------------------------------------------------------------------
    def train_param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"kernel": (self.units, self.input_shape[0])}
        if self.use_bias:
            shapes["bias"] = (self.units,)
        return shapes

    def to_file_layout(self, short, value):
        return value.T if short == "kernel" else value

    def from_file_layout(self, short, value):
        return value.T if short == "kernel" else value

    def fans(self) -> tuple[int, int]:
        return self.input_shape[0], self.units

    def forward(self, bound, x, rng):
        out = np.empty((x.shape[0], self.units), x.dtype)
        relu = bound.act == RELU
        K.dense_forward(x, bound.params["kernel"], bound.bias(x.dtype, self.units), out, relu)
        return activate(out, bound.act, relu_done=True), (x, out)

    def backward(self, bound, dout, cache, need_dx):
        x, y = cache
        relu = bound.act == RELU
        dz = np.ascontiguousarray(dout if relu else activation_grad(dout, y, bound.act))
        w = bound.params["kernel"]
        db = bound.grads["bias"] if self.use_bias else np.empty(self.units, w.dtype)
        dx = np.empty_like(x) if need_dx else np.empty((1, x.shape[1]), x.dtype)
        K.dense_backward(x, w, y, dz, bound.grads["kernel"], db, dx, relu, need_dx)
        return dx if need_dx else None

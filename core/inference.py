"""Forward execution of a validated architecture with the Numba kernels of `core/kernels/`.

`InferencePlan` turns the layer list into typed steps once (`build_steps`): the fusion rules of
`layers/fusion.py` group layers into blocks and each block's layer emits its steps, with weights
packed for the kernels (conv + 2x2/2 max pool in one kernel, a standalone activation folded into
the layer before it, the model's preprocessing into the first convolution); dropout and flatten
cost nothing (flatten is a view: NHWC is already H, W, C order). A conv followed by a conv that
reads a zero-bordered input writes its output straight into that border's interior, so the
second conv needs no padding copy (`_writes_into_next`). Batches above the plan's chunk
(BATCH_CHUNK images unless the planner found larger chunks faster) run in chunks; one set of
activation buffers, sized for the largest chunk seen, is reused by every call, which allocates
only its result.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numba
import numpy as np
from convserve.core import aligned
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.architecture import Architecture
from convserve.core.errors import ModelError
from convserve.core.kernels import dense as kdense
from convserve.core.kernels.elementwise import SIGNS, finite_f32
from convserve.core.layers.dense import chain_dense_steps
from convserve.core.layers.fusion import blocks
from convserve.core.steps import INPUT, RESULT, Call, Preprocess, Program, Step
from convserve.core.threads import thread_count_reader

BATCH_CHUNK = 32  # larger batches run through the network in chunks of this many images, by
# default (the planner may choose larger ones: `planner.measure_chunk`)
# ... unless the model has only dense layers (steps on rows, `Step.ROWS`): their activations are
# small, and a dense task that shares its weights among more rows runs faster
ROWS_CHUNK = kdense.MAX_TASK_ROWS
FLOAT32 = np.dtype(np.float32)  # numpy's native float32 dtype, one object: a cheap identity test


def bind_args(call: Call, x: np.ndarray, result: np.ndarray | None) -> Any:
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


def _check_finite(finite: bool, what: str) -> None:
    """Raise ModelError naming `what` unless `finite`."""
    if not finite:
        raise ModelError(f"{what} contains NaN or Inf")


def _entry_point(dispatcher: Any, args: Any) -> Any:
    """The compiled function a numba dispatcher runs for `args`, callable directly: it skips
    the dispatcher's type resolution (about half of a call's overhead). The dispatcher itself
    when the signature cannot be found."""
    try:
        return dispatcher.overloads[tuple(numba.typeof(a) for a in args)].entry_point
    except (AttributeError, KeyError, TypeError, ValueError):
        return dispatcher


Plan = dict[int, str]  # layer index -> kernel variant, for the layers that have a choice


def default_plan(arch: Architecture, winograd: bool = True) -> Plan:
    """Today's heuristic choice for every layer with alternatives: each layer's first variant;
    `winograd=False` takes the first non-Winograd one (for comparison)."""
    plan: Plan = {}
    for block in blocks(arch.layers, inference=True):
        variants = block.layer.inference_variants(block)
        names = [v for v in variants if winograd or not v.startswith("winograd")]
        if names:
            plan[block.layer.index] = names[0]
    return plan


def fitting_plan(arch: Architecture, plan: Plan) -> Plan:
    """The entries of `plan` that `arch`'s blocks can run (a model cut after a conv whose pool
    it fused loses the pooled variants), the defaults for the rest."""
    fitting = default_plan(arch)
    for block in blocks(arch.layers, inference=True):
        index = block.layer.index
        if plan.get(index) in block.layer.inference_variants(block):
            fitting[index] = plan[index]
    return fitting


def build_steps(
    arch: Architecture, weights: dict[str, np.ndarray], plan: Plan | None = None
) -> list[Step]:
    """The model's kernel steps: fusion blocks, each compiled by its layer (packing weights)
    with the kernel variant `plan` names for it (a layer it does not name: its default)."""
    plan = plan or {}
    steps: list[Step] = []
    for block in blocks(arch.layers, inference=True):
        variant = plan.get(block.layer.index)
        emitted = block.layer.inference_steps(block, weights, not steps, variant)
        if not steps and not emitted[0].takes_raw:  # the preprocessing, when no conv comes first
            steps.append(Preprocess(shape=arch.input_shape, takes_raw=True))
        steps += emitted
    return chain_dense_steps(steps)


class InferencePlan:
    """Runs a model's layers on float32 NHWC batches. Safe to call from several threads
    (calls are serialized; the kernels themselves use every core and release the GIL)."""

    def __init__(
        self,
        architecture: Architecture,
        weights: dict[str, np.ndarray],
        plan: Plan | None = None,
        chunk: int | None = None,
    ):
        """`plan`: the kernel variant per layer (default: `default_plan`). `chunk`: the most
        images a pass runs at once (default: `default_chunk`); larger batches run in chunks."""
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
        given = plan or {}
        self.plan: Plan = {i: given.get(i, v) for i, v in default_plan(arch).items()}
        self.steps = build_steps(arch, weights, self.plan)
        for step in self.steps:
            step.align_arrays()
        self._into_next = [self._writes_into_next(k) for k in range(len(self.steps))]
        self._flat_input = self._first_reads_input()
        self.chunk = self.default_chunk if chunk is None else chunk
        self.threads = numba.config.NUMBA_NUM_THREADS
        self._threads_now = thread_count_reader()
        # per-thread scratch; 512 floats at least: the first-layer kernels' 2x8x32 block
        tile = max(512, *(step.tile_floats() for step in self.steps))
        # rows of whole cache lines, so that every thread's scratch starts on one
        self._tiles = aligned.zeros((self.threads, -(-tile // 16) * 16))
        self._turn = np.zeros(1, np.int64)  # runs so far (`Program.turn`)
        # `Program.scan_wanted` and `Program.scan_flags`
        self._scan_wanted = np.zeros(1, np.int64)
        self._scan_flags = np.zeros(self.threads * 8, np.uint64)
        self._runs = memoryview(self._turn)  # the same count: a cheaper increment than numpy's
        self._capacity = 0  # batch size the activation buffers are allocated for
        self._buffers: list[np.ndarray | None] = []
        self._padded: dict[int, np.ndarray] = {}
        self._input: np.ndarray | None = None
        self._programs: dict[tuple[int, bool, int], Any] = {}
        self._lock = threading.Lock()

    # -- public ---------------------------------------------------------------------------
    @property
    def default_chunk(self) -> int:
        """ROWS_CHUNK for a model of dense layers only (steps on rows), else BATCH_CHUNK."""
        return ROWS_CHUNK if all(step.ROWS for step in self.steps) else BATCH_CHUNK

    def run(self, x: np.ndarray, preprocess: bool = False, check: str | None = None) -> np.ndarray:
        """`x`: (N, H, W, C) batch, its shape checked by the caller. With `preprocess=False` it
        is float32 and already preprocessed; with `preprocess=True` it holds raw pixels (any real
        dtype) and the model's `(p * scale - mean) / std` is applied inside the first kernel.
        With `check` (the input's name in the message), a NaN or infinity in x raises
        ModelError: found by the first kernel where it reads the batch itself
        (`Program.scans_input`), else by a scan before the pass (of x as given where it is
        not float32: a cast could overflow).
        Returns a new float32 (N, outputs) array."""
        n = x.shape[0]
        with self._lock:
            if x.dtype is not FLOAT32 or not x.flags.c_contiguous:
                if check is not None and x.dtype is not FLOAT32:  # before the cast can overflow
                    _check_finite(bool(np.isfinite(x).all()), check)
                    check = None
                if self._input is None or self._input.shape[0] < n:
                    self._input = aligned.empty(x.shape)
                buf = self._input[:n]
                np.copyto(buf, x, casting="unsafe")
                x = buf
            if n <= self.chunk:
                return self._forward_chunk(x, preprocess, None, check)
            # large batches run in chunks: a bound on the activations' memory, and on the
            # data a layer leaves for the next (`planner.measure_chunk` times the sizes)
            result = np.empty((n, self.architecture.num_outputs), np.float32)
            for start in range(0, n, self.chunk):
                stop = min(n, start + self.chunk)
                self._forward_chunk(x[start:stop], preprocess, result[start:stop], check)
            return result

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Compile (or load from numba's cache) every kernel the model can need and allocate
        the buffers, by running each batch size once (plus 1, 8 and BATCH_CHUNK, which between
        them reach every kernel: small steps run serial versions), and 1 and 8 images on one
        thread too, as a server runs small batches (`threads.threads_by_batch`): there a chain
        of dense layers that runs in one parallel region on every thread runs its layers' own
        serial kernels instead (`layers.dense.DenseChainStep`)."""
        threads = numba.get_num_threads()
        passes = [(threads, sorted({1, 8, BATCH_CHUNK, *batch_sizes}))]
        if threads > 1:
            passes.append((1, [1, 8]))
        try:
            for count, sizes in passes:
                numba.set_num_threads(count)
                for n in sizes:
                    x = np.zeros((n, *self.architecture.input_shape), np.float32)
                    self.run(x)
                    self.run(x, preprocess=True)
        finally:
            numba.set_num_threads(threads)

    # -- internals ------------------------------------------------------------------------
    def _writes_into_next(self, k: int) -> bool:
        """Whether step k writes its output into the interior of step k+1's padding buffer:
        its kernels can place their output, and the next step is a conv whose zero-bordered
        input holds all of it (a 'valid' conv may read fewer rows than there are)."""
        if k + 1 >= len(self.steps) or not self.steps[k].PLACES_OUTPUT:
            return False
        shape, p = self.steps[k].shape, self.steps[k + 1].padding
        if shape is None or p is None or not p.needs_pad or self.steps[k + 1].takes_raw:
            return False
        return p.pt + shape[0] <= p.shape[0] and p.pl + shape[1] <= p.shape[1]

    def _reads_padded(self, k: int) -> bool:
        """Whether step k reads a zero-bordered buffer of its own: it pads or preprocesses its
        input, and either the step before writes into that buffer or the step has no way to
        pad the rows it reads itself (`Step.pads_rows`)."""
        step = self.steps[k]
        if step.padding is None or not (step.padding.needs_pad or step.takes_raw):
            return False
        return not step.pads_rows or (k > 0 and self._into_next[k - 1])

    def _first_reads_input(self) -> bool:
        """Whether preprocessed input can skip the `Preprocess` step (then a plain copy): the
        steps after it up to the first that computes are views, and that one only reads its
        input (a dense layer). It then reads the caller's array, flattened."""
        if not isinstance(self.steps[0], Preprocess):
            return False
        for step in self.steps[1:]:
            if not step.VIEW:
                return step.READS_INPUT_ONLY
        return False

    def _buffers_for(self, n: int) -> list[np.ndarray | None]:
        """Activation buffers for a batch of n: views of one set sized for the largest batch
        seen so far (C-contiguous prefixes, so kernel signatures do not change)."""
        if n > self._capacity:
            bufs: list[np.ndarray | None] = []
            for k, step in enumerate(self.steps):
                last = k == len(self.steps) - 1
                if step.shape is None or step.VIEW or last or self._into_next[k]:
                    bufs.append(None)
                else:
                    bufs.append(aligned.empty((n, *step.shape)))
            # zero-padded conv inputs: only their interior is ever written, the border stays zero
            self._padded = {
                k: aligned.zeros((n, *step.padding.shape))
                for k, step in enumerate(self.steps)
                if self._reads_padded(k)
            }
            self._buffers, self._capacity = bufs, n
            self._programs.clear()
        return [None if b is None else b[:n] for b in self._buffers]

    def _forward_chunk(
        self, x: np.ndarray, preprocess: bool, result: np.ndarray | None, check: str | None
    ) -> np.ndarray:
        n = x.shape[0]
        key = (n, preprocess, self._threads_now())
        program = self._programs.get(key)
        fresh = program is None
        if fresh:
            program = self._programs[key] = self._program(n, preprocess, key[2])
        calls, result_shape, final, _, scans = program
        if scans:  # the first kernel scans the input on this run only when asked to
            self._scan_wanted[0] = check is not None
        elif check is not None:
            _check_finite(finite_f32(x), check)
        self._runs[0] += 1
        if self._flat_input and not preprocess:
            x = x.reshape(n, -1)  # a view: x is C-contiguous
        if result_shape is not None and result is None:
            result = np.empty(result_shape, np.float32)
        if fresh:
            for k, call in enumerate(calls):
                args = bind_args(call, x, result)
                call[0](*args)
                # from now on call the compiled code this call picked
                calls[k] = (_entry_point(call[0], args), *call[1:])
        else:  # the hot path: a small model's forward pass takes ~12 us, so each call's own
            # list of arguments gets its input and result in place, and lets go of them after
            for fn, args, in_pos, res_pos in calls:
                if in_pos >= 0:
                    args[in_pos] = x
                if res_pos >= 0:
                    args[res_pos] = result
                fn(*args)
                if in_pos >= 0:
                    args[in_pos] = INPUT
                if res_pos >= 0:
                    args[res_pos] = RESULT
        if check is not None and scans:
            _check_finite(not self._scan_flags[0] & SIGNS, check)  # (all threads' flags)
        if result_shape is not None:
            return result
        if result is not None:  # the last step worked in place: copy out
            result[...] = final.reshape(n, -1)
            return result
        return final.reshape(n, -1).copy()

    def _program(self, n: int, preprocess: bool, threads: int):
        """(calls, result shape, final buffer, each call's step, whether its first kernel
        scans the input for NaN and infinity (`Program.scans_input`)) of a batch of n; calls
        as (kernel, args, input position, result position), each call's args in a list of its
        own; `INPUT` and `RESULT` stand for the call's input and its freshly allocated result."""
        bufs = self._buffers_for(n)
        program = Program(
            n,
            threads,
            self._tiles,
            (self._row_scale, self._row_shift),
            self._identity,
            self._turn,
            self._scan_wanted,
            self._scan_flags,
        )
        # one view per buffer: a step that wrote into the next one's is recognised by identity
        padded = {k: buf[:n] for k, buf in self._padded.items()}
        x: Any = INPUT
        result_shape = None
        last = len(self.steps) - 1
        owners: list[int] = []  # the step each call belongs to
        for k, step in enumerate(self.steps):
            if k == 0 and self._flat_input and not preprocess:
                continue  # the input is used as it is (flattened by `_forward_chunk`)
            if step.shape is None:
                out = x
            elif self._into_next[k]:
                out = padded[k + 1]
            elif k == last and not step.VIEW:  # a view is copied out by the caller
                out, result_shape = RESULT, (n, *step.shape)
            else:
                out = bufs[k]
            if step.PLACES_OUTPUT:
                p = self.steps[k + 1].padding if self._into_next[k] else None
                program.at = (p.pt if p else 0, p.pl if p else 0, *step.shape[:2])
            program.raw = step.takes_raw and preprocess
            program.padded = padded.get(k)
            x = step.emit(program, x, out)
            owners += [k] * (len(program.calls) - len(owners))
        # each call's arguments in a list of its own, for the hot path of `_forward_chunk`
        calls = [(fn, list(args), in_pos, res_pos) for fn, args, in_pos, res_pos in program.calls]
        final = None if x is RESULT else x
        return calls, result_shape, final, owners, program.scans_input

    def kernel_times(self, x: np.ndarray, rounds: int = 30) -> list[tuple[int, str, float]]:
        """Where a forward pass of the preprocessed batch x (at most `chunk` images) spends its
        time: per kernel call, in order, (the step it belongs to, the kernel's name, the median
        seconds of `rounds` runs of that call alone). Each call runs on the buffers the pass
        filled, so on the data it would see, warm as the calls before it left them."""
        n = x.shape[0]
        if not 0 < n <= self.chunk:
            raise ValueError(f"kernel_times takes 1 to {self.chunk} images, not {n}")
        self.run(x)  # builds the program and fills the buffers
        calls, result_shape, _, owners, _ = self._programs[(n, False, self._threads_now())]
        if self._flat_input:
            x = x.reshape(n, -1)
        result = None if result_shape is None else np.empty(result_shape, np.float32)
        times = []
        for call, step in zip(calls, owners):
            args = bind_args(call, x, result)
            seconds = []
            for _ in range(rounds):
                start = time.perf_counter()
                call[0](*args)
                seconds.append(time.perf_counter() - start)
            name = getattr(call[0], "__name__", type(call[0]).__name__)
            times.append((step, name, float(np.median(seconds))))
        return times

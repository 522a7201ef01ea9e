"""Inference steps: one or a few kernel calls each, emitted by the layers (`Layer.inference_steps`)
and run by `InferencePlan`.

A step is a typed object holding its packed weights and geometry. It knows its per-image output
shape, the per-thread scratch it needs (`tile_floats`), whether its input is copied into a
zero-bordered buffer first (`padding`), and how to append its kernel calls for a batch of n to a
`Program` (`emit`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from convserve.core import aligned
from convserve.core.kernels import elementwise, padding
from convserve.core.threads import SERIAL_MAX_WORK

INPUT = object()  # placeholders in a prepared program: the call's input and its result
RESULT = object()

# (kernel, args, input position, result position); the args a tuple as steps add them, a list
# of the call's own once `InferencePlan` has built its program
Call = tuple[Any, tuple | list, int, int]


@dataclass(frozen=True)
class Padding:
    """A conv input copied into a zero-bordered buffer of per-image `shape` at offset (pt, pl);
    `needs_pad`: the copy is needed even when no preprocessing rides on it."""

    shape: tuple[int, int, int]
    pt: int
    pl: int
    needs_pad: bool

    @staticmethod
    def for_output(
        input_shape: tuple[int, ...],
        rows_cols: tuple[int, int],
        kernel: tuple[int, int],
        strides: tuple[int, int],
        pads: tuple[int, int, int, int],
    ) -> Padding:
        """The padded input a 'valid' conv kernel reads to compute `rows_cols` output pixels."""
        h, w, c = input_shape
        hp = (rows_cols[0] - 1) * strides[0] + kernel[0]
        wp = (rows_cols[1] - 1) * strides[1] + kernel[1]
        pt, pl = pads[0], pads[2]
        return Padding((hp, wp, c), pt, pl, pt > 0 or pl > 0 or hp > pt + h or wp > pl + w)


class Program:
    """The kernel calls of one batch size being assembled; steps call `add`."""

    def __init__(
        self,
        n: int,
        threads: int,
        tiles: np.ndarray,
        affine: tuple,
        identity: tuple,
        turn: np.ndarray,
        scan_wanted: np.ndarray,
        scan_flags: np.ndarray,
    ):
        self.n, self.threads, self.tiles = n, threads, tiles
        # the run count's parity (one int64): kernels that stream weights alternate their
        # order with it (`kernels.dense.dense`)
        self.turn = turn
        self.calls: list[Call] = []
        self._affine, self._identity = affine, identity
        self.raw = False  # the current step applies the model's preprocessing
        self.padded: np.ndarray | None = None  # the current step's padding buffer
        # where the current step writes its (rows, columns) outputs in `out`: (y0, x0, rows,
        # columns); `out` is larger than that when it is the next conv's padding buffer
        self.at: tuple[int, int, int, int] = (0, 0, 0, 0)
        # a kernel that reads the caller's input (as float32) can look for NaN and infinity in
        # it as it goes, on the runs whose caller sets scan_wanted[0] (one int64), ORing what it
        # finds into scan_flags (threads * 8 uint64s, one a cache line;
        # `kernels.direct.conv_raw`); its step sets `scans_input`, else the caller scans first
        self.scan_wanted, self.scan_flags = scan_wanted, scan_flags
        self.scans_input = False

    def add(self, fn: Any, *args: Any) -> None:
        pos = [i for i, a in enumerate(args) if a is INPUT]
        res = [i for i, a in enumerate(args) if a is RESULT]
        self.calls.append((fn, args, pos[0] if pos else -1, res[0] if res else -1))

    @property
    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """The preprocessing `x * scale + shift` for the current step (identity unless raw),
        per channel repeated along an input row."""
        return self._affine if self.raw else self._identity

    def copies_input(self, step: Step, x: Any) -> bool:
        """Whether `pad` would copy `step`'s input `x`: it has padding or preprocessing to
        apply, and the step before did not write it padded."""
        p = step.padding
        return p is not None and (self.raw or p.needs_pad) and x is not self.padded

    def pad(self, step: Step, x: Any) -> Any:
        """Append the padding copy of `step`'s input when it needs one; returns what the conv
        kernel reads."""
        if not self.copies_input(step, x):
            return x
        p = step.padding
        buf = self.padded
        kernel = (
            padding.pad_input_serial
            if self.n * np.prod(p.shape) < SERIAL_MAX_WORK
            else padding.pad_input
        )
        self.add(kernel, x, *self.scale_shift, int(self.raw), buf, p.pt, p.pl)
        return buf


@dataclass(kw_only=True)
class Step:
    """One or a few kernel calls. `shape`: the per-image output shape (None: works in place)."""

    VIEW: ClassVar[bool] = False  # the output is a view of the input: no buffer of its own
    # its kernels can write their output into the interior of the next conv's padding buffer
    PLACES_OUTPUT: ClassVar[bool] = False
    # it works on rows of features: a model of such steps only runs a large batch in chunks of
    # ROWS_CHUNK, so that each task of a dense layer shares its weights among many rows
    ROWS: ClassVar[bool] = False
    # it only reads its input, which may then be the caller's array as given (flattened)
    READS_INPUT_ONLY: ClassVar[bool] = False

    shape: tuple[int, ...] | None
    takes_raw: bool = False  # may apply the model's preprocessing itself (a first conv)
    padding: Padding | None = None

    @property
    def pads_rows(self) -> bool:
        """Its kernel pads the input rows each task reads itself: where a padding copy would
        be needed, it reads the unpadded input and has no padding buffer."""
        return False

    def tile_floats(self) -> int:
        """Per-thread scratch floats the step's kernels need."""
        return 0

    def align_arrays(self) -> None:
        """Put the step's arrays (packed weights, bias) on cache lines (`aligned`)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                setattr(self, field.name, aligned.on_cache_line(value))

    def weight_bytes(self) -> int:
        """Bytes of the step's arrays (packed weights, bias): what it reads on every call."""
        values = (getattr(self, field.name) for field in dataclasses.fields(self))
        return sum(value.nbytes for value in values if isinstance(value, np.ndarray))

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        """Append the calls that compute `out` from `x`; returns the step's output."""
        raise NotImplementedError


@dataclass(kw_only=True)
class Preprocess(Step):
    """The model's preprocessing on its own, when no convolution comes first. On input that is
    already preprocessed it would be a plain copy: `InferencePlan` skips it when the next step
    that computes only reads its input."""

    ROWS: ClassVar[bool] = True

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        program.add(elementwise.preprocess, x, *program.scale_shift, out)
        return out


@dataclass(kw_only=True)
class Activate(Step):
    """A standalone activation, in place on rows of `width` values (softmax works per row)."""

    ROWS: ClassVar[bool] = True

    act: int
    width: int
    shape: tuple[int, ...] | None = None

    def emit(self, program: Program, x: Any, out: Any) -> Any:
        program.add(elementwise.activate, x.reshape(-1, self.width), self.act)
        return x

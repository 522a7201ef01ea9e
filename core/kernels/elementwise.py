"""Elementwise kernels (float32): activations, the bias + activation stores that end the conv
and dense kernels, preprocessing and the finiteness scan.

Activation codes are `convserve.core.activations.CODES` (softmax works on the last axis).
Kernels here use numba's `error_model="numpy"`: its default checks every float division for a
zero divisor, a branch that keeps loops holding tanh's division from vectorizing. The stores
run once per output pixel: they are inlined into the conv kernels' row loops.
"""

from __future__ import annotations

import numpy as np
from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.extending import intrinsic

_Z = np.float32(0.0)
_ONE = np.float32(1.0)


_HALF = np.float32(0.5)
_QUARTER = np.float32(0.25)
_TANH_CLAMP = np.float32(7.90531110763549805)  # float32 tanh is +-1 within 3.5e-7 past this
# tanh(x) ~ x * P(x^2) / Q(x^2) on [-clamp, clamp]: the minimax rational fit Eigen uses for
# float tanh; largest error 3.5e-7 over all floats (checked in tests against float64 tanh).
_TP = (
    np.float32(4.89352455891786e-03),
    np.float32(6.37261928875436e-04),
    np.float32(1.48572235717979e-05),
    np.float32(5.12229709037114e-08),
    np.float32(-8.60467152213735e-11),
    np.float32(2.00018790482477e-13),
    np.float32(-2.76076847742355e-16),
)
_TQ = (
    np.float32(4.89352518554385e-03),
    np.float32(2.26843463243900e-03),
    np.float32(1.18534705686654e-04),
    np.float32(1.19825839466702e-06),
)


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _tanh(v):
    """tanh in float32 by a rational function: additions, multiplies and one division, so loops
    calling it vectorize (libm's tanhf is a scalar call per value, 10-20 times slower)."""
    x = min(max(v, -_TANH_CLAMP), _TANH_CLAMP)
    x2 = x * x
    p = _TP[6]
    p = p * x2 + _TP[5]
    p = p * x2 + _TP[4]
    p = p * x2 + _TP[3]
    p = p * x2 + _TP[2]
    p = p * x2 + _TP[1]
    p = p * x2 + _TP[0]
    q = _TQ[3]
    q = q * x2 + _TQ[2]
    q = q * x2 + _TQ[1]
    q = q * x2 + _TQ[0]
    return x * p / q


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _act(v, act):
    """Activation `act` of one value; sigmoid(v) = (1 + tanh(v/2)) / 2, on the vectorizing tanh.
    Inlined, it compiles under its caller's error model: every kernel calling it uses numpy's
    (on a Zen 3, tanh after a dense layer of 64 rows x 300 units added 36-48 us to the layer in
    a kernel with numba's default model, its division scalar, and 3-6 us with numpy's)."""
    if act == 1:
        return v if v > _Z else _Z
    if act == 2:
        return _tanh(v)
    if act == 3:
        return _HALF + _HALF * _tanh(_HALF * v)
    return v


# x - n ln 2 in float64, which no rearranging of the sum can spoil (ln 2 in two float32 parts,
# the usual way, lost up to 4 ulp where the compiled code had folded the parts back together)
_LOG2E = np.float64(1.4426950408889634)
_LN2 = np.float64(0.6931471805599453)
# exp of this is 1.2e-38, still a normal float; below it, 0 near enough
_EXP_MIN = np.float32(-87.3)
# exp(r) ~ 1 + r + r^2 P(r) for |r| <= ln(2)/2: Cephes' expf polynomial (about 1 ulp)
_EP = (
    np.float32(1.9875691500e-4),
    np.float32(1.3981999507e-3),
    np.float32(8.3334519073e-3),
    np.float32(4.1665795894e-2),
    np.float32(1.6666665459e-1),
    np.float32(5.0000001201e-1),
)


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits`."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())

    return types.float32(types.int32), codegen


@njit(error_model="numpy", cache=True, nogil=True)
def _exp_shifted(row, m):
    """row[j] = exp(row[j] - m), for row[j] <= m, by range reduction to [-ln(2)/2, ln(2)/2] and
    a polynomial: arithmetic, a floor and bit operations, so the loop vectorizes (libm's expf
    is a call per value: a 256 x 300 softmax took 460 us of its dense layer's 1,259 on an Intel
    Xeon, one thread; 218 us this way)."""
    for j in range(row.size):
        x = np.float64(max(row[j] - m, _EXP_MIN))
        n = np.floor(x * _LOG2E + 0.5)
        r = np.float32(x - n * _LN2)
        p = _EP[0]
        p = p * r + _EP[1]
        p = p * r + _EP[2]
        p = p * r + _EP[3]
        p = p * r + _EP[4]
        p = p * r + _EP[5]
        p = p * (r * r) + r + _ONE
        row[j] = p * _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


SOFTMAX_ROWS = 16  # rows of a standalone softmax per task (`activate`)


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _softmax_rows(out, r0, r1):
    """Softmax of rows r0..r1 of the C-contiguous 2-D `out`, in place: each row less its
    maximum, then one `_exp_shifted` over all the rows' values back to back, then each row over
    its sum. One vector loop over the rows together: a 10-class head alone gives a loop of 10
    values, mostly its scalar tail (256 rows of 10 on an Intel Xeon, one thread: libm's expf
    per value 7.1 us, the vector loop row by row 12.4 us; mlp_tanh's 100 -> 10 layer at 256
    rows on two threads: the softmax added 6.2 us by expf, 2.5 us so). A row's values take the
    same operations whichever rows it is with (the exp is elementwise, with no contraction in
    its vector body or tail), so results do not depend on the batch."""
    width = out.shape[1]
    for i in range(r0, r1):
        row = out[i]
        m = row[0]
        for j in range(1, width):
            m = row[j] if row[j] > m else m
        for j in range(width):
            row[j] -= m
    _exp_shifted(out.reshape(out.size)[r0 * width : r1 * width], _Z)
    for i in range(r0, r1):
        row = out[i]
        s = _Z
        for j in range(width):
            s += row[j]
        inv = _ONE / s
        for j in range(width):
            row[j] *= inv


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def activate(x, act):
    """In place: x = act(x) on a C-contiguous 2-D array; softmax (4) works on each row, in
    tasks of SOFTMAX_ROWS rows (`_softmax_rows`)."""
    if act == 4:
        rows = x.shape[0]
        for t in prange((rows + SOFTMAX_ROWS - 1) // SOFTMAX_ROWS):
            _softmax_rows(x, t * SOFTMAX_ROWS, min(rows, (t + 1) * SOFTMAX_ROWS))
        return
    for r in prange(x.shape[0]):
        row = x[r]
        if act == 1:
            for j in range(row.size):
                v = row[j]
                row[j] = v if v > _Z else _Z
        else:
            for j in range(row.size):
                row[j] = _act(row[j], act)


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True, nogil=True)
def preprocess(x, scale, shift, out):
    """out = x * scale + shift per channel; x, out: (N, H, W, C); scale and shift hold the
    per-channel values repeated along a row (W*C values), so that each row is one contiguous,
    vectorized run (a loop over a pixel's few channels would stay scalar). A task an image."""
    N, H, W, C = x.shape
    row = W * C
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    for n in prange(N):
        for y in range(H):
            o = (n * H + y) * row
            src = xf[o : o + row]
            dst = of[o : o + row]
            for j in range(row):
                dst[j] = src[j] * scale[j] + shift[j]


# The finiteness scan runs on all threads from this many floats (512 KB) on. Alone, on a Zen 3
# with 2 threads, 1-17 MB took 0.80-0.51x the serial scan's time, 0.5 MB 0.89x, 0.25 MB 1.19x
# (the threads' start-up; fastest of 300 calls). Before a forward pass it also leaves each
# thread's share of the batch in that thread's cache: on an Intel Xeon, 2 threads, scan and
# pass took 0.94-0.97x the time with the serial scan for mlp_tanh at 256 rows (800 KB), 0.98x
# for wide_dense, and 0.99-1.00x at 100-130 thousand floats; at 25-50 thousand, 1.00-1.05x.
PARALLEL_SCAN_FLOATS = 1 << 17
SCAN_PARTS = 8  # pieces of the parallel scan: a thread that starts late takes fewer


EXPONENTS = np.uint64(0x7F8000007F800000)  # the exponent fields of two float32s in a uint64
LOWEST = np.uint64(0x0080000000800000)  # each field's lowest bit
SIGNS = np.uint64(0x8000000080000000)


@njit(cache=True, nogil=True)
def _exponent_or(flat):
    """The OR over the float32s of the 1-D contiguous `flat`, two at a time as uint64, of
    (exponent field + its lowest bit): a float's sign bit in the result (`SIGNS`) is set
    exactly when some value's exponent is all ones (NaN, infinity); a field's sum never
    carries into the next. Integer operations vectorize (a float test would need strict IEEE
    semantics, which do not), and an OR reduction more simply than a max: 1.5x faster over
    200-800 KB on a Zen 3. In uint64, as numba types uint32 arithmetic: on uint32s it widened
    every lane to 64 bits (an Intel Xeon, 200 KB: 3.8 us against 2.1)."""
    pairs = flat.size // 2
    words = flat[: 2 * pairs].view(np.uint64)
    acc = np.uint64(0)
    for i in range(words.size):
        acc |= (words[i] & EXPONENTS) + LOWEST
    if flat.size % 2:  # the last float alone, in the low field
        acc |= (np.uint64(flat[flat.size - 1 :].view(np.uint32)[0]) & EXPONENTS) + LOWEST
    return acc


@njit(cache=True, nogil=True)
def all_finite_f32(x):
    """True when no value of the C-contiguous float32 array x (any rank) is NaN or infinite
    (`_exponent_or`). The view is taken here: in numpy it costs more than the scan of a small
    image."""
    return _exponent_or(x.reshape(x.size)) & SIGNS == 0


@njit(parallel=True, cache=True, nogil=True)
def all_finite_f32_parallel(x):
    """`all_finite_f32` on all threads, for large arrays (PARALLEL_SCAN_FLOATS)."""
    flat = x.reshape(x.size)
    per = ((flat.size + SCAN_PARTS - 1) // SCAN_PARTS + 1) // 2 * 2  # even: whole pairs
    found = np.zeros(SCAN_PARTS, np.uint64)
    for p in prange(SCAN_PARTS):
        found[p] = _exponent_or(flat[min(flat.size, p * per) : min(flat.size, (p + 1) * per)])
    acc = np.uint64(0)
    for p in range(SCAN_PARTS):
        acc |= found[p]
    return acc & SIGNS == 0


def finite_f32(x) -> bool:
    """`all_finite_f32` of the C-contiguous float32 x, on all threads from PARALLEL_SCAN_FLOATS
    floats on."""
    if x.size >= PARALLEL_SCAN_FLOATS:
        return bool(all_finite_f32_parallel(x))
    return bool(all_finite_f32(x))


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _store_pooled(tile, i0, i1, COp, bias, of, o, CO, act, average):
    """of[o + co] = act(max of a 2x2 window + bias[co]) for co < CO, the window's conv outputs at
    tile rows i0, i0 + COp (upper conv row) and i1, i1 + COp (lower); with `average`, the mean
    of the four act(output + bias[co]). Unsigned flat indices: numba's negative-index check on a
    signed computed index keeps loops like this one scalar."""
    a = np.uint64(i0)
    b = np.uint64(i0 + COp)
    c = np.uint64(i1)
    d = np.uint64(i1 + COp)
    oo = np.uint64(o)
    if average:
        for co in range(CO):
            u = np.uint64(co)
            bc = bias[co]
            s = _act(tile[a + u] + bc, act) + _act(tile[b + u] + bc, act)
            s += _act(tile[c + u] + bc, act) + _act(tile[d + u] + bc, act)
            of[oo + u] = s * _QUARTER
    elif act == 1:
        for co in range(CO):
            u = np.uint64(co)
            m = max(max(tile[a + u], tile[b + u]), max(tile[c + u], tile[d + u])) + bias[co]
            of[oo + u] = m if m > _Z else _Z
    else:
        for co in range(CO):
            u = np.uint64(co)
            of[oo + u] = _act(
                max(max(tile[a + u], tile[b + u]), max(tile[c + u], tile[d + u])) + bias[co], act
            )


@njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def _store_curved(tile, ldt, bias, of, o, ldo, rows, count, act):
    """of[o + r*ldo + j] = act(tile[r*ldt + j] + bias[j]) for `rows` rows r and j < count, for
    tanh and sigmoid (act 2, 3), the same values wherever it is called from: in whole groups of
    16, the last one in the tile (whose rows, like the bias, hold whole 16s past count), then
    copied. In `_store_row`'s loop the values past its last whole vector run as scalar code,
    which the compiler may rearrange otherwise than the vector code (under fastmath), and
    differently in each kernel it is inlined into: a dense layer's single-row kernel gave a
    tanh or sigmoid output that differed in its last bit from the same sum's in a batch. Not
    inlined, and not called from `_store_row`: with the call there, every store around it
    slowed (the 10-unit softmax layer of mlp_tanh at 64 rows from 6.2 to 7.0-8.7 us on an
    Intel Xeon)."""
    whole = count // 16 * 16
    for r in range(rows):
        tt = np.uint64(r * ldt)
        oo = np.uint64(o + r * ldo)
        for g in range(0, whole, 16):
            for k in range(16):
                u = np.uint64(g + k)
                of[oo + u] = _act(tile[tt + u] + bias[u], act)
        if whole < count:
            for k in range(16):
                u = np.uint64(whole + k)
                tile[tt + u] = _act(tile[tt + u] + bias[u], act)
            for j in range(whole, count):
                u = np.uint64(j)
                of[oo + u] = tile[tt + u]


@njit(inline="always", fastmath=True, error_model="numpy", cache=True, nogil=True)
def _store_row(tile, t, bias, of, o, lo, hi, act, b=0):
    """of[o + j] = act(tile[t + j] + bias[b + j]) for lo <= j < hi (unsigned indices, as
    above). A range of channels from c0 goes as lo = 0 and b = c0: with lo = c0 and a signed
    bias index a conv call took 1.4x as long (the strided net's first layer: 192 us, 134)."""
    tt = np.uint64(t)
    oo = np.uint64(o)
    bb = np.uint64(b)
    if act == 1:
        for j in range(lo, hi):
            u = np.uint64(j)
            v = tile[tt + u] + bias[bb + u]
            of[oo + u] = v if v > _Z else _Z
    else:
        for j in range(lo, hi):
            u = np.uint64(j)
            of[oo + u] = _act(tile[tt + u] + bias[bb + u], act)

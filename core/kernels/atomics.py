"""Atomic operations on int64 counters for the threads of one parallel region: numba intrinsics
(numba has none of its own).

`dense.dense_chain` runs several dense layers in one parallel region: a thread claims a task
with `atomic_swap`, counts it done with `atomic_add`, and waits for a layer's last task with
`atomic_load` and `spin_pause` before it starts the next layer. Sequentially consistent
read-modify-writes and acquire loads: what one thread wrote before counting a task done is
visible to the thread that sees the count.
"""

from __future__ import annotations

import platform

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from convserve.core.kernels.ir import _array_data
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _element(context, builder, signature, args):
    """Pointer to counters[index] (arguments 0 and 1)."""
    return builder.gep(_array_data(context, builder, signature, args, 0), [args[1]])


def _read_modify_write(op: str):
    """An intrinsic (counters, index, value) that applies LLVM's `atomicrmw` `op` to
    counters[index] and value, and returns the value before."""

    @intrinsic
    def rmw(typingctx, counters, index, value):
        sig = types.int64(counters, types.intp, types.int64)

        def codegen(context, builder, signature, args):
            ptr = _element(context, builder, signature, args)
            return builder.atomic_rmw(op, ptr, args[2], "seq_cst")

        return sig, codegen

    return rmw


atomic_add = _read_modify_write("add")  # counters[index] += value
atomic_swap = _read_modify_write("xchg")  # counters[index] = value


@intrinsic
def atomic_load(typingctx, counters, index):
    """counters[index], read with acquire ordering (never hoisted out of a waiting loop)."""
    sig = types.int64(counters, types.intp)

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element(context, builder, signature, args), "acquire", 8)

    return sig, codegen


@intrinsic
def spin_pause(typingctx):
    """The x86 `pause` hint inside a waiting loop (nothing elsewhere): it spares the core's
    other hardware thread and the memory-order flush a spinning load would otherwise cause on
    exit."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if X86:
            fnty = ir.FunctionType(ir.VoidType(), [])
            pause = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return sig, codegen

"""Compile every micro-kernel of `core.kernels.ir` for the CPU named by NUMBA_CPU_NAME and
NUMBA_CPU_FEATURES (which may not be this machine's: nothing is run) and print, as JSON, what
each kernel's loops hold in machine code (`test_kernels_codegen`).

Run as a script in a fresh process, with NUMBA_CACHE_DIR set to a scratch directory: numba
reads the target CPU when it is imported.
"""

from __future__ import annotations

import inspect
import json
import re
import sys

from convserve.core import runtime
from convserve.core.kernels import dense, ir
from numba import njit, types

ARRAYS = {"a", "b", "c", "bias"}  # the intrinsics' array parameters; every other one is an int64
_LABEL = re.compile(r"^(\.LBB\d+_\d+):")
_VECTOR_STACK = re.compile(r"%[xyz]mm\d+.*\(%rsp\)|\(%rsp\).*%[xyz]mm\d+")


def wrapper(kernel):
    """A jitted function passing its arguments on to the intrinsic `kernel`, and its signature."""
    names = list(inspect.signature(kernel._defn).parameters)[1:]
    source = f"def call({', '.join(names)}):\n    kernel({', '.join(names)})\n"
    scope = {"kernel": kernel}
    exec(source, scope)  # the intrinsics take 10-15 positional arguments of fixed names
    signature = tuple(types.float32[::1] if n in ARRAYS else types.int64 for n in names)
    return njit(fastmath=True, nogil=True)(scope["call"]), signature


def inner_loops(asm: str) -> list[list[str]]:
    """The instructions of every innermost loop: a label, the code up to a jump back to it,
    and no other label in between."""
    lines = [line.rstrip() for line in asm.splitlines()]
    loops = []
    for i, line in enumerate(lines):
        label = _LABEL.match(line)
        if not label:
            continue
        for j in range(i + 1, len(lines)):
            if _LABEL.match(lines[j]):
                break
            if re.match(rf"^\s+j\w+\s+{re.escape(label.group(1))}$", lines[j]):
                body = [x.strip() for x in lines[i + 1 : j + 1]]
                loops.append([x for x in body if x and not x.startswith((".", "#"))])
                break
    return loops


def loop_facts(asm: str) -> list[dict]:
    """Per innermost loop with fused multiply-adds: how many, the vector registers they use,
    and the instructions moving vector registers to or from the stack (spills)."""
    facts = []
    for body in inner_loops(asm):
        fmas = [x for x in body if x.startswith("vfmadd")]
        if fmas:
            facts.append(
                {
                    "fmas": len(fmas),
                    "widths": sorted({w for x in fmas for w in re.findall(r"%([xyz])mm", x)}),
                    "spills": [x for x in body if _VECTOR_STACK.search(x)],
                }
            )
    return facts


def caller_facts() -> dict[str, list[dict]]:
    """`loop_facts` of kernels whose micro-kernels only compile to full-width registers with the
    constants their caller passes (a fresh compile of the caller's code, not numba's cache)."""
    f32, i64 = types.float32[::1], types.int64
    callers = {
        "dense._strips_call": (dense._strips_call, (i64, i64, f32, i64, i64, f32, i64, f32, i64))
    }
    facts = {}
    for name, (kernel, signature) in callers.items():
        fresh = njit(fastmath=True, error_model="numpy", nogil=True)(kernel.py_func)
        fresh.compile(signature)
        facts[name] = loop_facts(fresh.inspect_asm(signature))
    return facts


def main() -> None:
    registers, lanes = runtime.vector_registers()
    report = {"registers": registers, "lanes": lanes, "kernels": {}, "callers": caller_facts()}
    for name, kernel in sorted(vars(ir).items()):
        if not name.startswith(("_mk", "_slide")) or not hasattr(kernel, "_defn"):
            continue
        call, signature = wrapper(kernel)
        call.compile(signature)
        report["kernels"][name] = loop_facts(call.inspect_asm(signature))
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()

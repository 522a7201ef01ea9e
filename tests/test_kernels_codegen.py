"""The micro-kernels' machine code on CPUs this machine is not: every kernel the block choices
can pick for a register file keeps its accumulators in registers (no vector spill in its
loops) and uses the register file's full width (zmm with AVX-512, ymm with AVX2).

Each target is compiled, never run, in a fresh process (`codegen_probe.py`) with numba's
CPU name and features set the way `core.runtime` sets them on such a host. The AVX-512 targets
are Intel Xeons (Skylake-SP, Sapphire Rapids) and AMD Zen 4, compiled as `znver3` plus the
AVX-512 features its CPUID reports: what LLVM 14 (older llvmlite releases) detects it as, and a
valid target for newer LLVMs too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from convserve.core.kernels import dense, gemm, ir

_BASE = "+avx2,+fma,+avx,+f16c,+bmi,+bmi2,+popcnt,+sse4.2"
AVX2 = _BASE
# `runtime.host_cpu_features` adds -prefer-256-bit on AVX-512 hosts, so this does too
AVX512 = "+avx512f,+avx512dq,+avx512bw,+avx512vl,+avx512cd," + _BASE + ",-prefer-256-bit"
TARGETS = {
    "Intel Skylake-SP": ("skylake-avx512", AVX512),
    "Intel Sapphire Rapids": ("sapphirerapids", AVX512),
    "AMD Zen 4": ("znver3", AVX512),
    "AMD Zen 3": ("znver3", AVX2),
    "Intel Haswell": ("haswell", AVX2),
}
PROBE = Path(__file__).with_name("codegen_probe.py")


def _probe(target: tuple[str, str], cache: Path) -> dict:
    cpu, features = target
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": cpu,
        "NUMBA_CPU_FEATURES": features,
        "NUMBA_CACHE_DIR": str(cache / cpu / str(len(features))),
    }
    done = subprocess.run(
        [sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    cache = tmp_path_factory.mktemp("numba-cache")
    with ThreadPoolExecutor(2) as pool:  # one compiling process per core
        futures = {name: pool.submit(_probe, t, cache) for name, t in TARGETS.items()}
        return {name: future.result() for name, future in futures.items()}


def _recorder(record: set[str], name: str):
    def call(*args):
        record.add(name)

    return call


def conv_row_kernels(vectors: int, monkeypatch) -> set[str]:
    """The micro-kernels `gemm._conv_row` calls for a register file of `vectors` vectors of 16
    floats, weights in strips where `gemm.STRIPS` would put them there: its own Python code
    run over rows of 1-40 outputs and 16-256 columns, with the kernels replaced by recorders."""
    record: set[str] = set()

    def mk_call(R, nv, *args):
        record.add(f"_mk{R}x{nv}")

    def mk_strips(R, nv, *args):
        record.add("_mk1x4s" if nv == 4 else "_mk2x2s" if R == 2 else "_mk1x2s")

    def mk_wrapped(R, nv, *args):
        record.add(f"_mkw{R}x{nv}")

    monkeypatch.setattr(gemm, "_mk_call", mk_call)
    monkeypatch.setattr(gemm, "_mk_strips", mk_strips)
    monkeypatch.setattr(gemm, "_mk_wrapped", mk_wrapped)
    monkeypatch.setattr(gemm, "_wrapped_call", gemm._wrapped_call.py_func)
    strip = 16 if vectors >= 32 else 4096  # STRIPS = not WIDE
    for count in range(1, 41):
        for width in range(16, 257, 16):
            for narrow in (0, 1):
                gemm._conv_row.py_func(
                    None, 0, 1, 0, 1, 1, None, 0, 16, None, 0, width, count, width,
                    0, narrow, vectors, strip,
                )  # fmt: skip
                # runs over the ends of rows of 1-11 pixels (`direct.conv_runs`)
                for row_len in range(1, 2 * gemm.PEAK_BLOCK[0]):
                    for col0 in {0, row_len // 2, row_len - 1}:
                        gemm._conv_row.py_func(
                            None, 0, 1, 0, 1, 1, None, 0, 16, None, 0, width, count, width,
                            0, narrow, vectors, strip, col0, row_len, 1,
                        )  # fmt: skip
    return record


def segmented_kernels(vectors: int, monkeypatch) -> set[str]:
    """The 16-unit dense kernels `dense._segmented_rows` calls for 1-6 rows, its parts of
    inputs aliased in L1 or not, for a register file of `vectors` vectors of 16 floats."""
    record: set[str] = set()
    for name in vars(dense):
        if name.startswith(("_mks", "_mkt")):
            monkeypatch.setattr(dense, name, _recorder(record, name))
    for count in range(1, dense.SIX + 1):
        for inputs in (100, 4 * 1024 * ir.SEGMENTS):
            dense._segmented_rows.py_func(None, 0, inputs, None, None, count, 16, vectors)
    return record


# The rest, read off their callers: one dense row over two 64-unit blocks, or a whole one and
# a layer's narrower last one (AVX-512 only), dense weights in strips of 16 units
# (`dense._strip_rows`, offered on every register file), the first-layer kernels
# (`first_layer.conv1_pixels_pool2`) and the sliding-window rows of RGB first layers
# (`direct._slid_pixels`, AVX-512 only). (The 3-8 rows over strips of `dense._strip_groups`,
# AVX-512 only, are checked in their caller: below.)
SLIDERS = {"_slide3s1", "_slide3s2", "_slide5s1", "_slide5s2", "_slide7s2"}
OTHERS = {
    32: {"_mk1x8", "_mk1x5p", "_mk1x6p", "_mk1x7p", "_mk1x4s", "_mk2x2s", "_mkt6x2", "_mkt8x2"}
    | SLIDERS,
    8: {"_mk1x4s", "_mk2x2s", "_mkt6x1", "_mkt4x1"},
}
# The largest blocks of each register file: the enumeration must reach them.
LARGEST = {32: {"_mk6x4", "_mk12x1", "_mks6", "_mkw6x4", "_mkw12x1"}, 8: {"_mk6x1", "_mkw6x1"}}


def chosen(vectors: int, monkeypatch) -> set[str]:
    """Every micro-kernel the code may call for a register file of `vectors` vectors."""
    kernels = conv_row_kernels(vectors, monkeypatch) | segmented_kernels(vectors, monkeypatch)
    return kernels | OTHERS[vectors]


@pytest.mark.parametrize("target", list(TARGETS))
def test_chosen_kernels_keep_their_accumulators_in_full_width_registers(
    target, reports, monkeypatch
):
    report = reports[target]
    vectors = report["registers"] * report["lanes"] // 16
    width = {32: "z", 8: "y"}[vectors]
    kernels = chosen(vectors, monkeypatch)
    assert LARGEST[vectors] <= kernels
    unknown = kernels - set(report["kernels"])
    assert not unknown, f"{target}: the blocks ask for kernels that do not exist: {unknown}"
    for name in sorted(kernels):
        loops = report["kernels"][name]
        assert loops, f"{target}: no loop of fused multiply-adds found in {name}"
        for loop in loops:
            assert not loop["spills"], f"{target}: {name} spills: {loop['spills'][:4]}"
            assert loop["widths"] == [width], f"{target}: {name} uses {loop['widths']}"


@pytest.mark.parametrize("target", [t for t, (_, f) in TARGETS.items() if f == AVX512])
def test_dense_strip_groups_keep_their_accumulators_in_registers_in_their_caller(target, reports):
    """`dense._strips_call` (3-8 rows over pairs of 16-unit strips, 4-6 over four; AVX-512):
    with the constants it passes, every one of its nine micro-kernel loops keeps its up to 24
    accumulators in zmm registers. (Compiled on their own, with every stride a variable, the
    5- and 6-row kernels over four strips run out of registers for the addresses.)"""
    loops = reports[target]["callers"]["dense._strips_call"]
    assert sorted(loop["fmas"] for loop in loops)[-1] == 2 * 6 * 4  # two inputs a step
    assert len(loops) >= 9
    for loop in loops:
        assert not loop["spills"], f"{target}: spills: {loop['spills'][:4]}"
        assert loop["widths"] == ["z"], f"{target}: {loop['widths']}"


def test_the_spill_check_sees_a_block_too_large_for_avx2(reports):
    """6 x 64 channels (24 accumulators of 16 floats) cannot stay in AVX2's 16 registers of 8:
    the check must find its spills, or it could not find any."""
    loops = reports["AMD Zen 3"]["kernels"]["_mk6x4"]
    assert any(loop["spills"] for loop in loops)
    assert all(not loop["spills"] for loop in reports["AMD Zen 4"]["kernels"]["_mk6x4"])

"""`convserve summary` and the command dispatcher, run as a user would."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convserve", *args], capture_output=True, text=True, timeout=120
    )


def test_summary_prints_the_table(tmp_path, reference_model):
    path = tmp_path / "m.safetensors"
    reference_model.save(path)
    result = run("summary", str(path))
    assert result.returncode == 0, result.stderr
    assert "Total params: 243,786" in result.stdout
    assert "11x11x64" in result.stdout


def test_summary_of_a_bad_file_is_one_clear_line(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    result = run("summary", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("convserve summary: ") and "not valid JSON" in result.stderr


def test_help_lists_subcommands_without_importing_numba():
    code = "import sys; from convserve.cli import build_parser; build_parser(); print('numba' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert "summary" in run("--help").stdout


def test_a_reader_that_left_gets_no_traceback(tmp_path, reference_model):
    """`convserve summary m | head` when head has already exited: stdout is a pipe with no
    reader, so the first write fails; the command ends quietly with 141 (128 + SIGPIPE)."""
    import os

    path = tmp_path / "m.safetensors"
    reference_model.save(path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything
    try:
        result = subprocess.run(
            [sys.executable, "-m", "convserve", "summary", str(path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr

"""Triton's perf_analyzer runs to completion against a real server and prints its server-side
section (it aborts when ModelStatistics' compute counts differ), over ModelInfer and over
ModelStreamInfer. perf_analyzer comes from the `loadtest` extra and Debian's libb64-0d."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests import server_harness as h

SCRIPT = h.ROOT / "loadtest" / "perf_analyzer.py"
SERVER_LINE = re.compile(
    r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue \d+ usec \+ "
    r"compute input \d+ usec \+ compute infer \d+ usec \+ compute output \d+ usec\)"
)


@pytest.fixture(scope="module")
def server():
    return h.main_server()


def _perf(server, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--target", server.target, "--model", "fashion"]
        + ["--concurrency", "1,8", "--interval-ms", "500", *flags],
        capture_output=True,
        text=True,
        timeout=240,
        env=h.server_env(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags", [(), ("--streaming",)], ids=["unary", "stream"])
def test_perf_analyzer_completes_with_server_side_statistics(server, flags):
    out = _perf(server, *flags)
    assert out.count("Request concurrency:") == 2
    assert len(SERVER_LINE.findall(out)) == 2, out[-3000:]
    counts = [int(n) for n in re.findall(r"Successful request count: (\d+)", out)]
    assert len(counts) == 2 and min(counts) > 0
    assert "Server side statistics compute counts must be the same" not in out
    table = out[out.index("| concurrency |") :].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:4]] == ["1", "8"]
    assert all(float(row.split("|")[2]) > 0 for row in table[2:4])  # infer/s

"""`convserve classify`, `convserve health` and `convserve models` as subprocesses, with exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from convserve.core.presets import FASHION_MNIST_LABELS

from tests.client_servers import (
    ROOT,
    TRAINED,
    ServerProcess,
    example_files,
    free_port,
    write_repository,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = write_repository(
        tmp_path_factory.mktemp("repo"), {"fashion_mnist": "fashion_mnist"}
    )
    process = ServerProcess(repository, tmp_path_factory.mktemp("logs"))
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def convserve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, **(env or {}))
    environment.pop(
        "CONVSERVE_TARGET", None
    ) if env is None or "CONVSERVE_TARGET" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "convserve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=environment,
    )


def _unused_target() -> str:
    return f"127.0.0.1:{free_port()}"


def test_health(server):
    ok = convserve("health", "--target", server.target)
    assert ok.returncode == 0, ok.stderr
    assert "SERVING" in ok.stdout
    # The target may come from CONVSERVE_TARGET, as in the Docker image.
    assert convserve("health", env={"CONVSERVE_TARGET": server.target}).returncode == 0
    down = convserve("health", "--target", _unused_target(), "--timeout", "1")
    assert down.returncode == 1
    assert "UNAVAILABLE" in down.stderr and down.stdout == ""


def test_health_imports_neither_numba_nor_numpy(server):
    code = (
        "import sys; from convserve.cli import main; rc = main(['health', '--target', sys.argv[1]]); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'numba', 'llvmlite', 'numpy', 'PIL'}); "
        "print('heavy:', heavy); sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, server.target], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout, out.stdout


def test_classify_prints_a_table(server):
    files = [str(path.relative_to(ROOT)) for path, _, _ in example_files()]
    out = convserve("classify", *files, "--target", server.target)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["FILE", "LABEL", "SCORE"]
    assert len(lines) == 1 + len(files)
    for line, name in zip(lines[1:], files):
        assert line.startswith(name)
        label, score = line[len(name) :].rsplit(None, 1)
        assert label.strip() in FASHION_MNIST_LABELS and 0.0 <= float(score) <= 1.0
    if (
        TRAINED.is_file()
    ):  # with the shipped trained model the labels are the true ones (all but at most one)
        truths = [label for _, _, label in example_files()]
        assert (
            sum(
                line[len(n) :].rsplit(None, 1)[0].strip() == t
                for line, n, t in zip(lines[1:], files, truths)
            )
            >= len(files) - 1
        ), out.stdout


def test_classify_top_k(server):
    out = convserve(
        "classify",
        "examples/coat_6.png",
        "examples/sandal_8.png",
        "--top-k",
        "3",
        "--model",
        "fashion_mnist",
        "--target",
        server.target,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["FILE", "LABEL", "SCORE", "RANK"] and len(lines) == 7
    assert lines[1].startswith("examples/coat_6.png") and lines[4].startswith(
        "examples/sandal_8.png"
    )
    ranks = [int(line.split()[-1]) for line in lines[1:]]
    assert ranks == [1, 2, 3, 1, 2, 3]
    scores = [float(line.split()[-2]) for line in lines[1:]]
    assert scores[0] >= scores[1] >= scores[2] and scores[3] >= scores[4] >= scores[5]


def test_classify_failures(server):
    missing = convserve("classify", "examples/no_such.png", "--target", server.target)
    assert missing.returncode == 2 and "no such file: examples/no_such.png" in missing.stderr
    not_image = convserve("classify", "examples/labels.csv", "--target", server.target)
    assert not_image.returncode == 2 and "not a readable image" in not_image.stderr
    unknown = convserve(
        "classify", "examples/coat_6.png", "--model", "nope", "--target", server.target
    )
    assert unknown.returncode == 1
    assert "INVALID_ARGUMENT" in unknown.stderr and "'nope'" in unknown.stderr
    down = convserve(
        "classify", "examples/coat_6.png", "--target", _unused_target(), "--timeout", "1"
    )
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    bad_k = convserve("classify", "examples/coat_6.png", "--top-k", "0")
    assert bad_k.returncode == 2 and "--top-k" in bad_k.stderr


def test_models(server):
    out = convserve("models", "--target", server.target)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "VERSIONS", "INPUT", "CLASSES", "MAX", "BATCH"]
    assert lines[1].split() == ["fashion_mnist", "1", "UINT8", "28x28x1", "10", "64"]
    assert (
        "fashion_mnist labels: "
        + ", ".join(f"{i}={label}" for i, label in enumerate(FASHION_MNIST_LABELS))
        in out.stdout
    )
    down = convserve("models", "--target", _unused_target(), "--timeout", "1")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr

"""The server's installed dependencies never pull in SciPy.

numba imports SciPy at import time when it is installed (a version check), which costs a server
process memory and a second BLAS thread pool. The server does not block that import; instead
SciPy is kept out of what `pip install convserve` (and so the Docker image) installs.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _runtime_closure(name: str) -> set[str]:
    """Every distribution `name` needs at run time, without extras, recursively."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        dist = canonicalize_name(todo.pop())
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_no_runtime_dependency_pulls_in_scipy():
    closure = _runtime_closure("convserve")
    assert {"numba", "numpy", "grpcio"} <= closure  # the walk reached the real dependencies
    assert "scipy" not in closure

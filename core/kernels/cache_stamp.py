"""Key numba's on-disk cache of this package's kernels on a hash of all the package's sources.

Numba stamps a cached function with a hash of its own source file only. A kernel here inlines
or calls helpers from sibling files (`gemm._conv_row`, `ir._mk8x2`, ...), so a changed helper
would leave a stale compiled kernel in the cache. The locators below wrap numba's own (same
cache directories, same rules for choosing one) and replace the source stamp, for functions
defined in this package only, by `package_stamp()`.
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

from convserve.core import runtime as _runtime  # noqa: F401  (must precede numba)
from numba.core import caching

PACKAGE_DIR = Path(__file__).resolve().parent


def package_stamp(directory: Path = PACKAGE_DIR) -> str:
    """SHA-256 over the names and contents of every `.py` file in `directory`, in name order."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@cache
def _current_stamp() -> str:
    return package_stamp()  # sources do not change under a running process


def _in_package(py_file: str) -> bool:
    return Path(os.path.abspath(py_file)).parent == PACKAGE_DIR


def _package_locator(base: type) -> type:
    """`base` (one of numba's file-backed locators), stamped with the package hash and
    declining functions from elsewhere."""

    class PackageLocator(base):
        def get_source_stamp(self) -> str:
            return _current_stamp()

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _in_package(py_file):
                return None
            return super().from_function(py_func, py_file)

    PackageLocator.__name__ = PackageLocator.__qualname__ = f"Package{base.__name__}"
    return PackageLocator


def _numba_class(name: str) -> type:
    """A class of numba.core.caching by its public name (numba >= 0.61) or its older private one."""
    return getattr(caching, name, None) or getattr(caching, f"_{name}")


LOCATORS = tuple(
    _package_locator(_numba_class(name))
    for name in ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
)


def install() -> None:
    """Put the package locators first in numba's list (idempotent)."""
    classes = _numba_class("CacheImpl")._locator_classes
    if classes[: len(LOCATORS)] != list(LOCATORS):
        classes[:0] = LOCATORS

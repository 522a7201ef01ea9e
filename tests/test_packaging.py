"""A regular (non-editable) install ships every package: pyproject's list matches the tree.

An editable install maps whole folders, so a package missing from `packages` only shows up in a
wheel, such as the Docker image's.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *relative)))
    assert found <= listed, f"missing from pyproject.toml packages: {sorted(found - listed)}"
    assert listed <= found, f"listed in pyproject.toml but not found: {sorted(listed - found)}"

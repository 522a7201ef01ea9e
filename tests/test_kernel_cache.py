"""The kernels' numba cache is keyed on all of the kernel package's sources."""

from __future__ import annotations

import shutil

from convserve.core.kernels import cache_stamp, direct, gemm


def test_changing_a_shared_helper_changes_every_kernels_cache_key(tmp_path):
    copy = tmp_path / "kernels"
    shutil.copytree(cache_stamp.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = cache_stamp.package_stamp(copy)
    assert before == cache_stamp.package_stamp(cache_stamp.PACKAGE_DIR)
    helper = copy / "gemm.py"  # `_conv_row`, called by the direct, Winograd and dense kernels
    helper.write_text(helper.read_text().replace("c += 16 * nv", "c += 16 * nv  # changed"))
    assert cache_stamp.package_stamp(copy) != before


def test_kernels_use_the_package_stamp_and_other_code_does_not():
    for kernel in (direct.conv, gemm._conv_row):
        locator = kernel._cache._impl._locator
        assert type(locator) in cache_stamp.LOCATORS
        assert locator.get_source_stamp() == cache_stamp.package_stamp()
    from convserve.core.training import kernels as training_kernels

    other = training_kernels.sum_partials._cache._impl._locator
    assert type(other) not in cache_stamp.LOCATORS

"""Malformed model files and absurd architectures: one-line `ModelError`s naming the file, also
from `convserve summary`, and the size limits (docs/hardening.md)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from convserve.core import Model, ModelError
from convserve.core.architecture import parse_architecture
from convserve.core.limits import Limits, batch_bytes, check_limits, image_activation_bytes
from convserve.core.presets import PRESET_NAMES, preset

from tests.hostile_models import absurd_architecture, hostile_files, lenet, model_bytes
from tests.server_harness import ROOT, server_env

CASES = hostile_files()


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_hostile_file_is_one_line_model_error_naming_the_file(tmp_path, case):
    data, fragment = CASES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(ModelError) as info:
        Model.load(path)
    message = str(info.value)
    assert message.startswith(f"model file {path}: "), message
    assert fragment in message, message
    assert "\n" not in message and len(message) <= 400, message


def test_summary_prints_the_line_and_exits_nonzero(tmp_path):
    """One process for every case (each a fresh interpreter would take minutes)."""
    paths = []
    for i, case in enumerate(sorted(CASES)):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(CASES[case][0])
        paths.append((case, path))
    for case, path in paths[:: max(1, len(paths) // 8)] + [
        p for p in paths if "deep" in p[0] or "metadata" in p[0] or "absurd" in p[0]
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "convserve", "summary", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            env=server_env(),
            cwd=ROOT,
        )
        assert done.returncode == 1, (case, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], (case, done.stderr)
        assert CASES[case][1] in lines[0] and "Traceback" not in done.stderr, (case, lines)


def test_absurd_architecture_refused_before_allocating():
    with pytest.raises(ModelError, match=r"input: dimension .* 100,000, .*--max-dimension"):
        Model(absurd_architecture(), {})
    # without the dimension limit the activation limit refuses it: 10^10 floats per image
    with pytest.raises(ModelError, match=r"per image is 40,000,000,004, .*--max-image-activation"):
        Model(absurd_architecture(), {}, Limits(max_dimension=0))


def test_batch_limit_names_max_batch_size():
    document, weights = lenet()
    with pytest.raises(ModelError, match=r"batch of 1,000,000,000 images.*--max-batch-size"):
        Model(document, weights, batch_size=1_000_000_000)
    assert Model(document, weights, batch_size=64).predict(np.zeros((2, 28, 28, 1))).shape == (
        2,
        10,
    )


def test_limits_are_plain_numbers_and_zero_disables():
    document, weights = lenet()
    arch = Model(document, weights).architecture
    per_image = image_activation_bytes(arch)
    # lenet's widest layer: the first pooling, 28x28x6 in and 14x14x6 out, float32
    assert per_image == 4 * (28 * 28 * 6 + 14 * 14 * 6)
    assert batch_bytes(arch, 10) == 10 * (2 * 4 * 784 + 4 * 10 + per_image)
    with pytest.raises(ModelError, match="parameter count"):
        check_limits(arch, Limits(max_parameters=arch.param_count() - 1))
    check_limits(arch, Limits(max_parameters=arch.param_count()))
    with pytest.raises(ModelError, match="activation bytes per image"):
        check_limits(arch, Limits(max_image_activation_bytes=per_image - 1))
    check_limits(arch, Limits(0, 0, 0, 0), batch_size=10**12)


def vgg16_document() -> dict:
    """VGG-16 at 224x224x3 (138 M parameters): a large but sensible classifier."""
    layers: list[dict] = []
    for filters, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        layers += [
            {"type": "conv2d", "filters": filters, "kernel_size": 3, "padding": "same"}
        ] * convs
        layers.append({"type": "max_pooling2d", "pool_size": 2})
    layers += [
        {"type": "flatten"},
        {"type": "dense", "units": 4096, "activation": "relu"},
        {"type": "dense", "units": 4096, "activation": "relu"},
        {"type": "dense", "units": 1000, "activation": "softmax"},
    ]
    return {"name": "vgg16", "input": {"shape": [224, 224, 3]}, "layers": layers}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_default_limits_fit_bundled_presets_at_the_largest_request(name):
    check_limits(parse_architecture(preset(name)), Limits(), batch_size=8192)


def test_default_limits_fit_vgg16_at_batch_64():
    arch = parse_architecture(vgg16_document())
    assert 138_000_000 < arch.param_count() < 139_000_000
    check_limits(arch, Limits(), batch_size=64)


def test_valid_file_still_loads(tmp_path):
    document, weights = lenet()
    path = tmp_path / "ok.safetensors"
    path.write_bytes(model_bytes(document, weights))
    assert Model.load(path).num_classes == 10

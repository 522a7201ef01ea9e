"""Real convserve servers on loopback for the client tests (`convserve serve` subprocesses).

Not a test module: helpers the client test modules share. Each server gets a free 127.0.0.1
port, metrics disabled, a short drain, and logs to a file shown when something fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from tests.server_harness import Server, free_port  # noqa: F401 (free_port is re-exported)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TRAINED = ROOT / "models" / "fashion_mnist" / "1" / "model.safetensors"


def write_repository(root: Path, presets: dict[str, str]) -> Path:
    """A model repository {name: preset}; fashion_mnist is the trained model when the repo ships one."""
    from convserve.core import Model
    from convserve.core.presets import preset

    from tests.conftest import random_weights

    for name, preset_name in presets.items():
        folder = root / name / "1"
        folder.mkdir(parents=True, exist_ok=True)
        if preset_name == "fashion_mnist" and TRAINED.is_file():
            shutil.copyfile(TRAINED, folder / "model.safetensors")
        else:
            document = dict(preset(preset_name), name=name)
            Model(document, random_weights(document, seed=len(name))).save(
                folder / "model.safetensors"
            )
    return root


class ServerProcess(Server):
    """`convserve serve` with the client tests' defaults: no metrics, warm-up of batch 1, no drain window."""

    def __init__(self, repository: Path, log_dir: Path, *flags: str, port: int | None = None):
        super().__init__(
            repository,
            "--warmup-batch-sizes",
            "1",
            "--drain-seconds",
            "0",
            "--grace-period",
            "5",
            *flags,
            metrics=False,
            port=port,
            log_dir=log_dir,
        )


def statistics(target: str, model: str) -> tuple[int, int]:
    """(images inferred, successful requests) of a model, from the server's ModelStatistics."""
    import grpc
    from convserve.proto import grpc_service_pb2 as pb
    from convserve.proto import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=10
        )
    images = sum(s.inference_count for s in response.model_stats)
    requests = sum(s.inference_stats.success.count for s in response.model_stats)
    return images, requests


def example_files() -> list[tuple[Path, int, str]]:
    """(path, class index, label) of every example PNG."""
    import csv

    with open(EXAMPLES / "labels.csv") as f:
        return [
            (EXAMPLES / r["file"], int(r["class_index"]), r["label"]) for r in csv.DictReader(f)
        ]


def decoded_examples() -> np.ndarray:
    """The example PNGs as the model sees them: (N, 28, 28, 1) uint8, converted like Pillow."""
    from PIL import Image

    images = []
    for path, _, _ in example_files():
        image = Image.open(path).convert("L")
        if image.size != (28, 28):
            image = image.resize((28, 28), Image.Resampling.BILINEAR)
        images.append(np.asarray(image)[:, :, None])
    return np.stack(images)

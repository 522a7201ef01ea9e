"""Import a source file into a `convserve/1` file, checked against the source runtime; export.

`import_model` detects the format by content (ONNX protobuf, `.keras` zip, legacy Keras HDF5),
converts, builds our `Model`, runs it and the source model (ONNX Runtime, or Keras when
installed) on the same random batch, and writes the file only if they agree within
`TOLERANCE`. The file's metadata `source` records the file name, format and date.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from convserve.core.errors import ModelError
from convserve.core.interop import UnsupportedModel
from convserve.core.interop.builder import ModelBuilder

TOLERANCE = 1e-4  # absolute, relative to the output's magnitude when that exceeds 1
VERIFY_BATCH = 3
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass
class Source:
    """A converted source model and how to run the original."""

    builder: ModelBuilder
    name: str | None
    labels: list[str] | None
    format: str
    run: Callable[[np.ndarray], np.ndarray] | None  # NHWC float32 batch -> outputs
    runtime: str  # what `run` uses, or why it is missing
    batch: int | None = None  # a batch size the source graph fixes


@dataclass
class ImportReport:
    path: Path
    document: dict[str, Any]
    max_diff: float | None
    runtime: str
    notes: list[str] = field(default_factory=list)


def detect_format(data: bytes) -> str:
    """`keras` (zip), `keras-h5` (HDF5) or `onnx` (anything else, checked when parsed)."""
    from convserve.core.interop.keras_import import is_keras_zip

    if is_keras_zip(data):
        return "keras"
    if data.startswith(HDF5_SIGNATURE):
        return "keras-h5"
    if data.startswith(b"PK"):
        raise UnsupportedModel("source: a zip file without config.json (not a .keras model)")
    return "onnx"


def read_source(path: Path, data: bytes) -> Source:
    """Convert the model file at `path` (whose contents are `data`)."""
    kind = detect_format(data)
    try:
        return _read_source(kind, path, data)
    except ModelError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, OSError) as exc:
        # a file whose structure is not what its format promises (hand-made or hostile)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedModel(
            f"{path.name}: malformed {kind} file ({type(exc).__name__}: {message})"
        ) from None


def _read_source(kind: str, path: Path, data: bytes) -> Source:
    if kind == "onnx":
        from convserve.core.interop.onnx_import import import_onnx, load_onnx_file

        model = load_onnx_file(path, data)
        parsed = import_onnx(model)
        run, runtime = _onnx_runner(model.SerializeToString(), parsed.input_nchw)
        return Source(
            parsed.builder, parsed.name, parsed.labels, parsed.format, run, runtime, parsed.batch
        )
    from convserve.core.interop import keras_import

    reader = keras_import.import_keras_zip if kind == "keras" else keras_import.import_keras_h5
    parsed = reader(data)
    run, runtime = _keras_runner(data, parsed.suffix)
    return Source(parsed.builder, parsed.name, None, parsed.format, run, runtime)


def import_model(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    labels: list[str] | None = None,
    scale: float | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ImportReport:
    """Convert `src`, verify it against the source runtime, and write `out`."""
    from convserve.core.model import Model
    from convserve.core.modelfile import write_model_file

    src = Path(src)
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise UnsupportedModel(f"{src}: cannot read: {exc.strerror or exc}") from None
    source = read_source(src, data)
    model_name = name or source.name or _name_from(src)
    document, tensors = source.builder.document(model_name, labels or source.labels)
    try:
        model = Model(document, tensors)
    except ModelError as exc:
        raise UnsupportedModel(f"converted model is invalid: {exc}") from None
    max_diff = None
    if source.run is not None:
        max_diff = verify(
            model, source.run, source.runtime, batch=source.batch, scale=source.builder.pre.scale
        )
    if scale is not None or mean is not None or std is not None:
        document = _with_preprocessing(document, source.builder, scale, mean, std)
        try:
            Model(document, tensors)
        except ModelError as exc:
            raise UnsupportedModel(f"--input-*: {exc}") from None
    stamp = {
        "file": src.name,
        "format": source.format,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_model_file(out, document, tensors, metadata={"source": json.dumps(stamp)})
    return ImportReport(Path(out), document, max_diff, source.runtime, source.builder.notes)


def verify(
    model: Any,
    run: Callable[[np.ndarray], np.ndarray],
    runtime: str,
    *,
    batch: int | None = None,
    scale: float = 1.0,
) -> float:
    """Run ours (`model.predict`) and `run` on one random batch of raw inputs; raise if they
    differ beyond TOLERANCE, else return the largest difference."""
    shape = (batch or VERIFY_BATCH, *model.input_shape)
    rng = np.random.default_rng(0)
    # inputs on the scale the preprocessing expects (pixels for a 1/255 scale)
    x = (rng.uniform(-1.0, 1.0, shape) / abs(scale)).astype(np.float32)
    try:
        theirs = np.asarray(run(x), np.float32)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModel(f"{runtime} cannot run the source model: {message}") from None
    ours = model.predict(x)
    if theirs.size != ours.size:
        raise UnsupportedModel(
            f"{runtime} gives output shape {list(theirs.shape)}, convserve {list(ours.shape)}"
        )
    theirs = theirs.reshape(ours.shape)
    diff = float(np.abs(ours - theirs).max())
    bound = TOLERANCE * max(1.0, float(np.abs(theirs).max()))
    if not diff <= bound:
        raise UnsupportedModel(
            f"converted model differs from {runtime} by {diff:.3g} (allowed {bound:.3g}); "
            "not written"
        )
    return diff


def _with_preprocessing(
    document: dict[str, Any],
    builder: ModelBuilder,
    scale: float | None,
    mean: list[float] | None,
    std: list[float] | None,
) -> dict[str, Any]:
    if builder.pre.scale != 1.0 or not builder.pre.plain:
        raise UnsupportedModel(
            f"--input-*: the source model already scales its input ({builder.pre.to_dict()}); "
            "leave the --input-* options out"
        )
    spec = dict(document["input"])
    spec["scale"] = 1.0 if scale is None else scale
    if mean is not None:
        spec["mean"] = list(mean)
    if std is not None:
        spec["std"] = list(std)
    return {**document, "input": spec}


def _name_from(path: Path) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.stem) or "model"


# -- source runtimes --------------------------------------------------------------------------
def _onnx_runner(data: bytes, nchw: bool) -> tuple[Callable | None, str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return None, "onnxruntime not installed"
    import onnxruntime as ort

    version = f"ONNX Runtime {ort.__version__}"
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModel(f"{version} cannot load the source model: {message}") from None
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        feed = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if nchw else x
        return session.run(None, {input_name: feed})[0]

    return run, version


def _keras_runner(data: bytes, suffix: str) -> tuple[Callable | None, str]:
    if importlib.util.find_spec("keras") is None:
        return None, "keras not installed"
    if "KERAS_BACKEND" not in os.environ:  # Keras defaults to TensorFlow: use what is installed
        backend = next(
            (b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b)), None
        )
        if backend is None:
            return None, "keras has no backend installed"
        os.environ["KERAS_BACKEND"] = backend
    try:
        import keras
    except Exception as exc:  # a broken backend install
        return None, f"keras cannot start ({type(exc).__name__})"
    runtime = f"Keras {keras.__version__} ({keras.backend.backend()} backend)"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"source{suffix}"
        path.write_bytes(data)
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModel(f"{runtime} cannot load the source model: {message}") from None

    def run(x: np.ndarray) -> np.ndarray:
        return keras.ops.convert_to_numpy(model(x, training=False))

    return run, runtime


def export_model(
    model_file: str | os.PathLike, out: str | os.PathLike, *, layout: str = "nhwc"
) -> tuple[float | None, str]:
    """Write `model_file` as ONNX (raw pixels in, our preprocessing inside), checked with
    ONNX Runtime when installed; returns (max difference or None, runtime)."""
    from convserve.core.interop.onnx_export import onnx_model
    from convserve.core.model import Model
    from convserve.core.modelfile import atomic_write

    model = Model.load(model_file)
    data = onnx_model(model.architecture.to_dict(), model.weights, layout=layout, preprocess=True)
    run, runtime = _onnx_runner(data, layout == "nchw")
    diff = None
    if run is not None:
        diff = verify(model, run, runtime, scale=model.architecture.scale)
    atomic_write(out, data)
    return diff, runtime

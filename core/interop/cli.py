"""`convserve import` (ONNX / Keras -> convserve/1) and `convserve export` (-> ONNX)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    imp = subparsers.add_parser(
        "import",
        help="convert an ONNX or Keras (.keras, .h5) model into a convserve/1 model file",
        description="Convert an ONNX (opset 9-22) or Keras (.keras, legacy .h5) CNN into a "
        "convserve/1 file, exactly or not at all. The format is detected from the contents. "
        "When ONNX Runtime (ONNX) or Keras (Keras files) is installed, the source model and the "
        "converted one are run on the same random batch; the file is written only if they agree "
        "within 1e-4.",
    )
    imp.add_argument("source", metavar="SRC", help="an .onnx, .keras or .h5 model file")
    imp.add_argument("--out", required=True, metavar="DST", help="the .safetensors file to write")
    imp.add_argument("--name", help="model name (default: from the source, else the file name)")
    imp.add_argument(
        "--labels",
        metavar="FILE|a,b,c",
        help="class labels: a text file with one label per line, or a comma-separated list",
    )
    imp.add_argument(
        "--input-scale",
        metavar="S",
        help="the raw pixels' scale before the model (e.g. 1/255), when the source model has none",
    )
    imp.add_argument("--input-mean", metavar="M[,M...]", help="per-channel mean, after scaling")
    imp.add_argument("--input-std", metavar="S[,S...]", help="per-channel std, after scaling")
    imp.set_defaults(func=run_import)

    exp = subparsers.add_parser(
        "export",
        help="write a convserve/1 model file as an ONNX model",
        description="Write a standard ONNX model (opset 17) that takes raw pixels (float32) and "
        "applies the model's preprocessing, so ONNX Runtime gives convserve's results. Input "
        "'input' is [N, H, W, C] (--layout nhwc, the default, as convserve serves) or "
        "[N, C, H, W] (--layout nchw); output 'output' is [N, classes].",
    )
    exp.add_argument("model_file", metavar="MODEL_FILE", help="a convserve/1 .safetensors file")
    exp.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    exp.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc", help="input layout")
    exp.set_defaults(func=run_export)


def _numbers(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [_number(v) for v in text.split(",")]
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{flag}: expected numbers separated by commas, got {text!r}") from None


def _number(text: str) -> float:
    """A float, or a fraction such as 1/255."""
    top, _, bottom = text.strip().partition("/")
    return float(top) / float(bottom) if bottom else float(top)


def _labels(value: str | None) -> list[str] | None:
    if value is None:
        return None
    if os.path.isfile(value):
        lines = Path(value).read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()]
    return [v.strip() for v in value.split(",")]


def run_import(args: argparse.Namespace) -> int:
    from convserve.core.errors import ModelError
    from convserve.core.interop.convert import import_model

    try:
        scale = _numbers(args.input_scale, "--input-scale")
        if scale is not None and len(scale) != 1:
            raise ValueError("--input-scale: expected one number")
        report = import_model(
            args.source,
            args.out,
            name=args.name,
            labels=_labels(args.labels),
            scale=None if scale is None else scale[0],
            mean=_numbers(args.input_mean, "--input-mean"),
            std=_numbers(args.input_std, "--input-std"),
        )
    except (ModelError, ValueError, OSError) as exc:
        print(f"convserve import: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"convserve import: {args.source}: the model does not fit in memory", file=sys.stderr)
        return 1
    for note in report.notes:
        print(f"note: {note}")
    if report.max_diff is None:
        print(f"not verified: {report.runtime}")
    else:
        print(f"verified against {report.runtime}: max |difference| {report.max_diff:.2e}")
    layers = ", ".join(layer["type"] for layer in report.document["layers"])
    print(f"wrote {report.path} ({report.document['name']}: {layers})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from convserve.core.errors import ModelError
    from convserve.core.interop.convert import export_model

    try:
        diff, runtime = export_model(args.model_file, args.onnx, layout=args.layout)
    except (ModelError, ValueError, OSError) as exc:
        print(f"convserve export: {exc}", file=sys.stderr)
        return 1
    check = "not verified" if diff is None else f"max |difference| {diff:.2e}"
    print(
        f"wrote {args.onnx} (input 'input' {args.layout.upper()}, raw pixels; {runtime}: {check})"
    )
    return 0

"""`convserve evaluate` and `convserve visualize`: a model file's quality on a dataset, and a
look inside it for one image (registered from convserve.core.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="accuracy, per-class precision/recall/F1, confusion matrix and throughput of a model file",
        description="Evaluate a model file on a labelled dataset (anything `convserve train --data` reads).",
    )
    p.add_argument("model_file", metavar="MODEL_FILE", help="a convserve/1 .safetensors file")
    p.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="fashion-mnist, an IDX or CIFAR-10 directory, an .npz file, or an image folder",
    )
    p.add_argument(
        "--split",
        choices=("auto", "test", "val", "train"),
        default="auto",
        help="which part to evaluate (default auto: test, else val, else train)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per predict call (256)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--confusion-matrix",
        metavar="FILE.png",
        help="also draw the confusion matrix as a labelled heat map (needs convserve[plot])",
    )
    p.set_defaults(func=run_evaluate)

    v = subparsers.add_parser(
        "visualize",
        help="draw an image's path through a model: filters, feature maps, top-5 (PNG)",
        description="One PNG with the input image, the first layer's filters, the feature maps "
        "after each convolution (all channels) and the top-5 predictions. Needs convserve[plot].",
    )
    v.add_argument("model_file", metavar="MODEL_FILE", help="a convserve/1 .safetensors file")
    v.add_argument("image", metavar="IMAGE", help="a PNG/JPEG file (converted and resized)")
    v.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    v.add_argument(
        "--layer",
        type=int,
        metavar="N",
        help="show only layer N's feature maps (a conv or pooling layer; see convserve summary)",
    )
    v.set_defaults(func=run_visualize)


def _fail(command: str, message: object) -> int:
    print(f"convserve {command}: {message}", file=sys.stderr)
    return 1


def run_evaluate(args: argparse.Namespace) -> int:
    from convserve.core.datasets import check_against, load_dataset
    from convserve.core.errors import ModelError
    from convserve.core.evaluate import evaluate_model, labels_for_model, select_split
    from convserve.core.figures import MissingExtra, draw_confusion, pyplot
    from convserve.core.model import Model

    if args.batch_size < 1:
        return _fail("evaluate", f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        if args.confusion_matrix:
            pyplot()  # say which extra is missing before minutes of work
        model = Model.load(args.model_file, batch_size=args.batch_size)
        dataset = load_dataset(
            args.data,
            model.input_shape,
            progress=not args.json and sys.stderr.isatty(),
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
        images, labels, split = select_split(dataset, args.split)
        labels = labels_for_model(dataset, labels, model)
        check_against(
            type(dataset)(images, labels, source=dataset.source),
            model.input_shape,
            model.num_classes,
        )
        result = evaluate_model(model, images, labels, args.batch_size)
        result.split, result.source = split, args.data
        if args.confusion_matrix:
            draw_confusion(
                args.confusion_matrix,
                result.confusion,
                result.labels,
                f"{model.name} on {Path(args.data).name or args.data} ({split}): "
                f"accuracy {result.accuracy:.2%}",
            )
    except (ModelError, ValueError, OSError, MissingExtra) as exc:  # DataError is a ValueError
        return _fail("evaluate", exc)
    print(json.dumps(result.to_json()) if args.json else result.format())
    if args.confusion_matrix and not args.json:
        print(f"confusion matrix drawn to {args.confusion_matrix}")
    return 0


def run_visualize(args: argparse.Namespace) -> int:
    import numpy as np
    from convserve.core.datasets import DataError
    from convserve.core.errors import ModelError
    from convserve.core.figures import MissingExtra, draw_activations, pyplot
    from convserve.core.imagefolder import decode_image
    from convserve.core.model import Model

    try:
        pyplot()
        model = Model.load(args.model_file)
        layers = model.architecture.layers
        spatial = [layer.index for layer in layers if len(layer.output_shape) == 3]
        if args.layer is not None:
            if args.layer not in spatial:
                raise ModelError(
                    f"--layer {args.layer}: choose a layer with feature maps: {spatial} "
                    "(see convserve summary)"
                )
            chosen = [args.layer]
        else:
            chosen = [layer.index for layer in layers if layer.type == "conv2d"] or spatial[:1]
        try:
            image = decode_image(Path(args.image), *model.input_shape)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"{args.image}: not a readable image: {exc}") from None
        except KeyError:
            raise DataError(
                f"{args.image}: the model takes {model.input_shape[2]} channels; only 1 or 3 can be drawn"
            ) from None
        outputs = model.activations(image, [*chosen, len(layers) - 1])
        scores = outputs[len(layers) - 1][0].reshape(-1)
        order = np.argsort(-scores, kind="stable")[: min(5, len(scores))]
        first = layers[0]
        draw_activations(
            args.out,
            image,
            first,
            model.weights.get(f"layers.{first.index}.kernel") if first.type == "conv2d" else None,
            [(layers[i], outputs[i][0]) for i in chosen],
            [(model.labels[k], float(scores[k])) for k in order],
            f"{model.name}: {Path(args.image).name}",
        )
    except (ModelError, ValueError, OSError, MissingExtra) as exc:
        return _fail("visualize", exc)
    print(f"wrote {args.out}")
    return 0

"""`convserve train`: the command-line face of `fit` (registered from convserve.core.cli)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from convserve.core.training.schedule import SCHEDULES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a dataset and write a convserve/1 model file",
        description="Train an architecture on a dataset; prints a progress bar per epoch, validation after each "
        "epoch, seconds per epoch and a confusion matrix; writes a checkpoint after every epoch.",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="fashion-mnist, a directory of IDX files, a CIFAR-10 binary directory, an .npz file, or an "
        "image folder (one subfolder of PNG/JPEG files per class; optional train/ and test/ or val/)",
    )
    p.add_argument(
        "--architecture",
        metavar="ARCH",
        help="preset name (fashion_mnist, lenet5, cifar10) or a JSON file (optional with --resume)",
    )
    p.add_argument(
        "--out", required=True, metavar="FILE", help="model file to write (.safetensors)"
    )
    for flag, options in TRAINING_OPTIONS:
        p.add_argument(flag, **options)
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint")
    p.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="checkpoint path (default <out>.checkpoint.safetensors)",
    )
    p.add_argument(
        "--history", metavar="FILE", help="history .csv or .json (default <out>.history.csv)"
    )
    p.add_argument(
        "--plot", metavar="FILE", help="loss/accuracy curves .png (default <out>.history.png)"
    )
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


# The hyperparameter flags: each sets the `TrainConfig` field of its name (unset: the default).
TRAINING_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--epochs", {"type": int, "help": "number of epochs (default 10)"}),
    ("--batch-size", {"type": int, "help": "mini-batch size (default 64)"}),
    ("--optimizer", {"choices": ("adam", "sgd"), "help": "default adam"}),
    ("--lr", {"type": float, "help": "learning rate (default 1e-3 for adam, 1e-2 for sgd)"}),
    ("--momentum", {"type": float, "help": "SGD momentum (default 0.9)"}),
    ("--nesterov", {"action": "store_true", "default": None, "help": "Nesterov momentum for SGD"}),
    ("--weight-decay", {"type": float, "help": "decoupled for adam, L2 for sgd (default 0)"}),
    (
        "--schedule",
        {
            "choices": SCHEDULES,
            "help": "learning-rate schedule per step (default constant); cosine decays to 0 "
            "over all --epochs",
        },
    ),
    ("--step-epochs", {"type": int, "help": "step schedule: epochs between decays (default 5)"}),
    ("--gamma", {"type": float, "help": "step schedule: decay factor (default 0.1)"}),
    ("--warmup-steps", {"type": int, "help": "linear warm-up steps (default 0)"}),
    (
        "--init",
        {
            "choices": ("auto", "he", "glorot"),
            "help": "kernel initialisation (default auto: He for ReLU)",
        },
    ),
    (
        "--flip",
        {"action": "store_true", "default": None, "help": "augment with random horizontal flips"},
    ),
    (
        "--shift",
        {
            "type": int,
            "metavar": "PIXELS",
            "help": "augment with random shifts of up to PIXELS rows and columns (pad and crop; "
            "default 0)",
        },
    ),
    (
        "--label-smoothing",
        {
            "type": float,
            "metavar": "EPS",
            "help": "train against targets (1 - EPS) * one-hot + EPS / classes (e.g. 0.1; "
            "default 0)",
        },
    ),
    (
        "--dropout-before-dense",
        {
            "type": float,
            "metavar": "RATE",
            "help": "dropout on the first dense layer's input, in training only; the saved model "
            "has no extra layer (default 0)",
        },
    ),
    (
        "--dropout-after-dense",
        {
            "type": float,
            "metavar": "RATE",
            "help": "dropout after every hidden dense layer, in training only (default 0)",
        },
    ),
    (
        "--ema",
        {
            "type": float,
            "metavar": "DECAY",
            "help": "keep an exponential moving average of the weights (e.g. 0.999) for "
            "validation and the saved model (default 0: off)",
        },
    ),
    (
        "--swa-start",
        {
            "type": int,
            "metavar": "EPOCH",
            "help": "stochastic weight averaging: average the weights at the end of epoch EPOCH "
            "and every later one, for validation and the saved model (default 0: off)",
        },
    ),
    ("--seed", {"type": int, "help": "random seed (default 0)"}),
    (
        "--validation-split",
        {
            "type": float,
            "help": "fraction held out for validation when the data has no test set (default 0.1)",
        },
    ),
)
_CONFIG_ARGS = tuple(flag[2:].replace("-", "_") for flag, _ in TRAINING_OPTIONS)


def run_train(args: argparse.Namespace) -> int:
    from convserve.core.errors import ModelError
    from convserve.core.training.trainer import TrainingInterrupted, fit

    overrides = {
        name: getattr(args, name) for name in _CONFIG_ARGS if getattr(args, name) is not None
    }
    try:
        fit(
            args.data,
            args.architecture,
            args.out,
            resume=args.resume,
            checkpoint=args.checkpoint,
            history_path=args.history,
            plot_path=False if args.no_plot else args.plot,
            progress=not args.quiet,
            log=lambda line: print(line, flush=True),
            **overrides,
        )
    except TrainingInterrupted as exc:
        print(f"convserve train: {exc}", file=sys.stderr)
        return 130
    except (ModelError, ValueError, OSError) as exc:  # DataError is a ValueError
        print(f"convserve train: {exc}", file=sys.stderr)
        return 1
    return 0

"""`fit(...)`: train an architecture on a dataset and write a `convserve/1` model file.

Reproducible: every random draw (initialisation, shuffling, augmentation, dropout) comes from a
generator seeded with (seed, purpose, epoch, step), and every kernel reduces in a fixed order, so
the same seed, data and machine give bit-identical weights, with or without a resume in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from convserve.core.architecture import Architecture, parse_architecture
from convserve.core.datasets import Dataset, check_against, load_dataset, split_validation
from convserve.core.errors import ModelError
from convserve.core.imagefolder import adopt_class_names
from convserve.core.layers import Dropout
from convserve.core.model import Model
from convserve.core.presets import PRESET_NAMES, preset
from convserve.core.training import kernels as K
from convserve.core.training.augment import random_flip, random_shift
from convserve.core.training.checkpoint import load_checkpoint, save_checkpoint
from convserve.core.training.dropout import original_weights, with_dropout
from convserve.core.training.network import Network
from convserve.core.training.optim import OPTIMIZERS, make_optimizer
from convserve.core.training.report import (
    confusion_matrix,
    format_confusion,
    plot_history,
    write_history,
)
from convserve.core.training.schedule import Schedule

# Purposes mixed into the seed, so each random stream is independent of the others.
_INIT, _SHUFFLE, _STEP = 1, 2, 3


@dataclass
class TrainConfig:
    """Hyperparameters. `lr` None means 1e-3 for Adam and 1e-2 for SGD."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    step_epochs: int = 5
    gamma: float = 0.1
    warmup_steps: int = 0
    init: str = "auto"
    seed: int = 0
    validation_split: float = 0.1
    flip: bool = False
    eval_batch_size: int = 500
    shift: int = 0  # random shifts of up to this many pixels (pad and crop)
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off)
    swa_start: int = 0  # average the weights at the end of this epoch (1-based) and later (0: off)
    label_smoothing: float = 0.0  # targets (1 - eps) * onehot + eps / classes
    dropout_before_dense: float = 0.0  # dropout on the first dense layer's input (training only)
    dropout_after_dense: float = 0.0  # dropout after every hidden dense layer (training only)

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 1e-3 if self.optimizer == "adam" else 1e-2
        if self.optimizer not in OPTIMIZERS:
            raise ModelError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ModelError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise ModelError(f"shift must be an integer >= 0 (pixels), got {self.shift!r}")
        if not 0 <= self.ema < 1:
            raise ModelError(f"ema must be in [0, 1) (0 turns it off), got {self.ema!r}")
        if isinstance(self.swa_start, bool) or not isinstance(self.swa_start, int):
            raise ModelError(f"swa_start must be an epoch number, got {self.swa_start!r}")
        if not 0 <= self.swa_start <= self.epochs:
            raise ModelError(
                f"swa_start must be an epoch in 1..{self.epochs} (0 turns it off), got {self.swa_start}"
            )
        if self.swa_start and self.ema:
            raise ModelError("choose one weight average: ema or swa_start, not both")
        if not 0 <= self.label_smoothing < 1:
            raise ModelError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        for name in ("dropout_before_dense", "dropout_after_dense"):
            if not 0 <= getattr(self, name) < 1:
                raise ModelError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ModelError(
                f"weight_decay must be >= 0 and momentum in [0, 1); got {self.weight_decay}, {self.momentum}"
            )


@dataclass
class TrainResult:
    model: Model
    history: list[dict[str, Any]]
    confusion: np.ndarray | None = None
    val_predictions: np.ndarray | None = None
    checkpoint: Path | None = None


class TrainingInterrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved at `checkpoint`."""

    def __init__(self, checkpoint: Path, epoch: int, step: int):
        super().__init__(
            f"interrupted at epoch {epoch + 1}, step {step}; checkpoint saved to {checkpoint} "
            f"(continue with --resume {checkpoint})"
        )
        self.checkpoint, self.epoch, self.step = checkpoint, epoch, step


def resolve_architecture(arch: str | dict[str, Any] | Architecture) -> dict[str, Any]:
    """A preset name, a path to a JSON file, a document or an `Architecture` -> the document."""
    if isinstance(arch, Architecture):
        return arch.to_dict()
    if isinstance(arch, dict):
        return arch
    name = str(arch)
    if name in PRESET_NAMES:
        return preset(name)
    path = Path(name)
    if not path.is_file():
        raise ModelError(
            f"architecture {name!r}: not a preset ({', '.join(PRESET_NAMES)}) and no such file"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"architecture file {path}: not valid JSON: {exc}") from None


def evaluate(
    network: Network, images: np.ndarray, labels: np.ndarray, batch_size: int = 500
) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predicted classes) of the network on raw images."""
    total, predictions = 0.0, np.empty(len(images), np.int64)
    for start in range(0, len(images), batch_size):
        x = network.preprocess(images[start : start + batch_size])
        logits = network.logits(x)
        loss_sum, _ = K.softmax_cross_entropy(
            logits,
            np.ascontiguousarray(labels[start : start + batch_size], np.int64),
            np.empty_like(logits),
        )
        total += loss_sum
        predictions[start : start + len(x)] = logits.argmax(axis=1)
    return total / len(images), float(np.mean(predictions == labels)), predictions


class _InterruptFlag:
    """Turns SIGINT into a flag checked between steps (main thread only), restored on exit."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptFlag:
        # Not where SIGINT is ignored (e.g. started in the background with nohup).
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _same_but_labels(given: dict[str, Any], checkpointed: dict[str, Any]) -> bool:
    """True when the checkpoint's architecture is `given` with class names taken from an image
    folder (labels set, last dense layer sized to them)."""
    labels = checkpointed.get("labels")
    if not isinstance(labels, list):
        return False
    return adopt_class_names(given, labels, lambda line: None) == checkpointed


@contextlib.contextmanager
def _averaged(network: Network, average: np.ndarray | None) -> Iterator[None]:
    """Run the block with the averaged weights in place of the current ones (if averaging)."""
    if average is None:
        yield
        return
    current = network.params.copy()
    network.params[:] = average
    try:
        yield
    finally:
        network.params[:] = current


def _default_paths(out: Path | None) -> tuple[Path | None, Path | None, Path | None]:
    if out is None:
        return None, None, None
    stem = out.name.removesuffix(".safetensors")
    return (
        out.with_name(stem + ".checkpoint.safetensors"),
        out.with_name(stem + ".history.csv"),
        out.with_name(stem + ".history.png"),
    )


def fit(
    data: str | Dataset,
    architecture: str | dict[str, Any] | Architecture | None = None,
    out: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    resume: str | Path | None = None,
    checkpoint: str | Path | None = None,
    history_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> TrainResult:
    """Train `architecture` on `data`; save the model to `out` (if given) and return it with its history.

    `data`: a `Dataset` or anything `load_dataset` accepts. `architecture`: a preset name, a JSON
    file, or a document (optional with `resume`). Hyperparameters come from `config` and/or keyword
    overrides (`epochs=15, lr=1e-3, ...`). A checkpoint (default `<out>.checkpoint.safetensors`) is
    written after every epoch and on Ctrl-C (then `TrainingInterrupted` is raised); `resume`
    continues from one. History CSV/JSON and PNG default to `<out>.history.csv` / `.png`;
    pass `plot_path=False` to skip the PNG.
    """
    out = Path(out) if out is not None else None
    default_ckpt, default_hist, default_plot = _default_paths(out)
    ckpt_path = Path(checkpoint) if checkpoint else default_ckpt
    hist_path = Path(history_path) if history_path else default_hist
    png_path = None if plot_path is False else (Path(plot_path) if plot_path else default_plot)

    state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "optimizer_t": 0,
        "history": [],
        "running": [0.0, 0, 0],
    }
    resumed: dict[str, np.ndarray] | None = None
    if resume is not None:
        doc, resumed, state = load_checkpoint(resume)
        given = None if architecture is None else resolve_architecture(architecture)
        if given is not None and given != doc and not _same_but_labels(given, doc):
            raise ModelError(f"checkpoint {resume}: its architecture differs from the one given")
        base = dict(state["config"])
        base.update({k: v for k, v in overrides.items() if k == "epochs"})
        config = TrainConfig(**base)
    else:
        if architecture is None:
            raise ModelError(
                "an architecture is needed (preset name, JSON file or document) unless resuming"
            )
        doc = resolve_architecture(architecture)
        config = (
            dataclasses.replace(config or TrainConfig(), **overrides)
            if overrides
            else (config or TrainConfig())
        )
        if overrides:
            config.__post_init__()
    arch = parse_architecture(doc)
    try:
        trained_doc, origin = with_dropout(
            doc, config.dropout_before_dense, config.dropout_after_dense
        )
    except ValueError as exc:
        raise ModelError(str(exc)) from None

    dataset = (
        data
        if isinstance(data, Dataset)
        else load_dataset(data, arch.input_shape, progress=progress, log=log)
    )
    if dataset.class_names is not None and list(arch.labels) != dataset.class_names:
        if resumed is not None:
            raise ModelError(
                f"checkpoint {resume}: its labels {list(arch.labels)} differ from the data's classes {dataset.class_names}"
            )
        doc = adopt_class_names(doc, dataset.class_names, log)
        arch = parse_architecture(doc)
        trained_doc, origin = with_dropout(
            doc, config.dropout_before_dense, config.dropout_after_dense
        )
    check_against(dataset, arch.input_shape, arch.num_outputs)
    held_out = dataset.x_val is not None or dataset.x_test is not None
    if held_out:  # a validation split the data brings: val/ first, else the test split
        x_train, y_train = dataset.x_train, dataset.y_train
        x_val, y_val = (
            (dataset.x_val, dataset.y_val)
            if dataset.x_val is not None
            else (dataset.x_test, dataset.y_test)
        )
    elif config.validation_split:
        x_train, y_train, x_val, y_val = split_validation(
            dataset.x_train, dataset.y_train, config.validation_split, config.seed
        )
    else:
        x_train, y_train, x_val, y_val = dataset.x_train, dataset.y_train, None, None

    network = Network(parse_architecture(trained_doc))
    network.initialize(np.random.default_rng([config.seed, _INIT]), config.init)
    n_train = len(x_train)
    steps = math.ceil(n_train / config.batch_size)
    schedule = Schedule(
        config.schedule,
        config.lr,
        steps,
        config.epochs,
        config.step_epochs,
        config.gamma,
        config.warmup_steps,
    )
    optimizer = make_optimizer(
        config.optimizer,
        network.size,
        network.dtype,
        **{name: getattr(config, name) for name in ("momentum", "nesterov", "weight_decay")},
    )
    if resumed is not None:
        if resumed["params"].shape != network.params.shape:
            raise ModelError(
                f"checkpoint {resume}: 'params' has {resumed['params'].size} values, expected {network.size}"
            )
        network.params[:] = resumed["params"]
        try:
            optimizer.load_state(resumed, state["optimizer_t"])
        except ValueError as exc:
            raise ModelError(f"checkpoint {resume}: {exc}") from None
        log(f"resuming from {resume}: epoch {state['epoch'] + 1}, step {state['step']}")
    history: list[dict[str, Any]] = state["history"]
    # the averaged weights (validation and the saved model use them): the EMA starts at the
    # initial weights, SWA at the end of epoch `swa_start` (swa_count epochs averaged so far)
    ema = network.params.copy() if config.ema else None
    swa = np.zeros_like(network.params) if config.swa_start else None
    swa_count = int(state.get("swa_count", 0))
    if resumed is not None:
        for name, average in (("ema", ema), ("swa", swa)):
            if average is None:
                continue
            if name not in resumed or resumed[name].shape != average.shape:
                raise ModelError(
                    f"checkpoint {resume}: no weight average {name!r} to continue --{name} with"
                )
            average[:] = resumed[name]
    needs_rng = (
        config.flip
        or config.shift
        or any(
            isinstance(layer, Dropout) and layer.rate > 0 for layer in network.architecture.layers
        )
    )

    def averaged_weights() -> np.ndarray | None:
        return ema if ema is not None else (swa if swa_count else None)

    def snapshot(epoch: int, step: int, running: list) -> None:
        if ckpt_path is None:
            return
        save_checkpoint(
            ckpt_path,
            doc,
            network.params,
            {
                **optimizer.state(),
                **({"ema": ema} if ema is not None else {}),
                **({"swa": swa} if swa is not None else {}),
            },
            {
                "epoch": epoch,
                "step": step,
                "optimizer_t": optimizer.t,
                "swa_count": swa_count,
                "history": history,
                "running": running,
                "config": dataclasses.asdict(config),
            },
        )

    from tqdm import tqdm

    predictions = None
    with _InterruptFlag() as interrupt:
        for epoch in range(state["epoch"], config.epochs):
            start_step = state["step"] if epoch == state["epoch"] else 0
            loss_sum, correct, seen = state["running"] if epoch == state["epoch"] else (0.0, 0, 0)
            order = np.random.default_rng([config.seed, _SHUFFLE, epoch]).permutation(n_train)
            bar = tqdm(
                total=steps,
                initial=start_step,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                unit="batch",
                disable=not progress,
                dynamic_ncols=True,
                leave=True,
            )
            started = time.perf_counter()
            trained = 0
            lr = schedule(epoch * steps + start_step)
            for step in range(start_step, steps):
                if interrupt.raised:
                    bar.close()
                    snapshot(epoch, step, [loss_sum, correct, seen])
                    raise TrainingInterrupted(ckpt_path, epoch, step)
                idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                x = network.preprocess(x_train[idx])
                rng = (
                    np.random.default_rng([config.seed, _STEP, epoch, step]) if needs_rng else None
                )
                if config.flip:
                    random_flip(x, rng)
                if config.shift:
                    x = random_shift(x, rng, config.shift)
                batch_loss, batch_correct = network.loss_and_grad(
                    x, y_train[idx], rng, config.label_smoothing
                )
                lr = schedule(epoch * steps + step)
                optimizer.step(network.params, network.grads, lr)
                if ema is not None:  # ema += (1 - decay) * (params - ema), in place
                    ema += np.float32(1 - config.ema) * (network.params - ema)
                loss_sum += batch_loss
                correct += batch_correct
                seen += len(idx)
                trained += len(idx)
                bar.update(1)
                if step % 20 == 0 or step == steps - 1:
                    rate = trained / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix_str(
                        f"loss {loss_sum / seen:.4f} acc {correct / seen:.4f} {rate:,.0f} img/s",
                        refresh=False,
                    )
            bar.close()
            seconds = time.perf_counter() - started
            if swa is not None and epoch + 1 >= config.swa_start:  # equal weight per epoch
                swa_count += 1
                swa += (network.params - swa) / np.float32(swa_count)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "loss": loss_sum / seen,
                "accuracy": correct / seen,
                "val_loss": None,
                "val_accuracy": None,
                "lr": lr,
                "seconds": round(seconds, 3),
                "images_per_second": round(trained / seconds, 1),
            }
            if x_val is not None:
                with _averaged(network, averaged_weights()):
                    record["val_loss"], record["val_accuracy"], predictions = evaluate(
                        network, x_val, y_val, config.eval_batch_size
                    )
            history.append(record)
            val = (
                f", val_loss {record['val_loss']:.4f}, val_accuracy {record['val_accuracy']:.4f}"
                if x_val is not None
                else ""
            )
            log(
                f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}, accuracy {record['accuracy']:.4f}{val}; "
                f"{seconds:.1f} s ({record['images_per_second']:,.0f} img/s), lr {lr:.3g}"
            )
            snapshot(epoch + 1, 0, [0.0, 0, 0])
            if hist_path is not None:
                write_history(hist_path, history)
            if png_path is not None:
                plot_history(
                    png_path,
                    history,
                    title=f"{arch.name} on {Path(dataset.source).name or dataset.source}",
                )

    if averaged_weights() is not None:
        network.params[:] = averaged_weights()  # the model kept is the average
    model = Model(doc, original_weights(network.to_weights(), origin))
    if out is not None:
        model.save(out)
        log(f"saved {out}")
    confusion = None
    if x_val is not None:
        if predictions is None:
            _, _, predictions = evaluate(network, x_val, y_val, config.eval_batch_size)
        confusion = confusion_matrix(y_val, predictions, arch.num_outputs)
        log(format_confusion(confusion, arch.labels))
    return TrainResult(model, history, confusion, predictions, ckpt_path)

"""`Model`: a validated architecture plus its weights, ready to predict."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from convserve.core.architecture import Architecture, parse_architecture
from convserve.core.errors import ModelError
from convserve.core.inference import FLOAT32, InferencePlan, default_plan
from convserve.core.kernels.elementwise import finite_f32
from convserve.core.limits import Limits, check_limits
from convserve.core.modelfile import one_line, read_model_file, write_model_file


def check_weights(architecture: Architecture, weights: dict[str, Any]) -> dict[str, np.ndarray]:
    """Check names, shapes, dtypes and finiteness; returns C-contiguous float32 arrays."""
    if not isinstance(weights, dict):
        raise ModelError(f"weights: expected a dict of name -> array, got {type(weights).__name__}")
    expected = architecture.weight_shapes()
    missing = [name for name in expected if name not in weights]
    if missing:
        shapes = ", ".join(f"{n} {list(expected[n])}" for n in missing)
        raise ModelError(f"weights: missing tensor(s): {shapes}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ModelError(
            f"weights: unexpected tensor(s) {extra}; the architecture expects {sorted(expected)}"
        )
    checked: dict[str, np.ndarray] = {}
    for name, shape in expected.items():
        value = weights[name]
        if not isinstance(value, np.ndarray):
            raise ModelError(
                f"weights: tensor '{name}' must be a numpy array, got {type(value).__name__}"
            )
        if value.dtype != np.float32:
            raise ModelError(f"weights: tensor '{name}' has dtype {value.dtype}, expected float32")
        if value.shape != shape:
            raise ModelError(
                f"weights: tensor '{name}' has shape {list(value.shape)}, expected {list(shape)}"
            )
        if not np.isfinite(value).all():
            raise ModelError(f"weights: tensor '{name}' contains NaN or Inf")
        checked[name] = np.ascontiguousarray(value)
    return checked


def all_finite(x: np.ndarray) -> bool:
    """No NaN or infinity in a float array (a compiled scan for C-contiguous float32)."""
    if x.dtype == np.float32 and x.flags.c_contiguous:
        return finite_f32(x)
    return bool(np.isfinite(x).all())


class Model:
    """A CNN classifier. `Model(architecture, weights)` validates both and infers all shapes."""

    def __init__(
        self,
        architecture: dict[str, Any],
        weights: dict[str, np.ndarray],
        limits: Limits | None = None,
        batch_size: int = 1,
        winograd: bool = True,
        plan: bool = True,
        plan_cache: str | os.PathLike | None = None,
        parallel_min_batch: int = 0,
    ):
        """`limits` (default `Limits()`) bound the sizes the model may need when run on batches
        of up to `batch_size` images; checked before any buffer is allocated. `winograd=False`
        runs 3x3 convolutions on the direct kernels (for comparison; no planning then).
        `plan`: `warmup` times the kernel variants of every layer that has a choice and keeps
        the fastest (`core/planner.py`; cached in `plan_cache`, default
        `planner.plan_cache_dir()`); False keeps the built-in heuristic choice.
        `parallel_min_batch`: batches below it will run on one numba thread (a server's thread
        policy, `threads.threads_by_batch`), so the planner times them that way."""
        self.architecture: Architecture = parse_architecture(architecture)
        check_limits(self.architecture, limits, batch_size)
        self.weights: dict[str, np.ndarray] = check_weights(self.architecture, weights)
        self._planning = plan and winograd
        self._plan_cache = plan_cache
        self._parallel_min_batch = parallel_min_batch
        self._batch_size = batch_size
        self._plan = InferencePlan(
            self.architecture, self.weights, default_plan(self.architecture, winograd)
        )

    def replica(self) -> Model:
        """Another instance of this model (same architecture, weights and kernel plan, its own
        buffers), for running batches side by side from several threads."""
        twin = Model.__new__(Model)
        twin.architecture, twin.weights = self.architecture, self.weights
        twin._planning, twin._plan_cache = self._planning, self._plan_cache
        twin._batch_size = self._batch_size
        twin._parallel_min_batch = self._parallel_min_batch
        twin._plan = InferencePlan(
            self.architecture, self.weights, self._plan.plan, self._plan.chunk
        )
        return twin

    @property
    def kernel_plan(self) -> dict[int, str]:
        """The kernel variant each layer with a choice runs: {layer index: variant}."""
        return dict(self._plan.plan)

    @property
    def batch_chunk(self) -> int:
        """The most images one pass runs at once: larger batches run in chunks of this many."""
        return self._plan.chunk

    # -- identity -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.architecture.name

    @property
    def labels(self) -> list[str]:
        return list(self.architecture.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.architecture.input_shape

    @property
    def num_classes(self) -> int:
        return self.architecture.num_outputs

    # -- files ----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        limits: Limits | None = None,
        batch_size: int = 1,
        **options: Any,
    ) -> Model:
        """Load a `convserve/1` model file (limits and `options` as in `Model()`); any problem
        raises `ModelError` with one line naming the file."""
        document, tensors = read_model_file(path)
        try:
            return cls(document, tensors, limits, batch_size, **options)
        except (ModelError, RecursionError) as exc:
            raise ModelError(one_line(f"model file {path}: {exc}")) from None

    def save(self, path: str | os.PathLike) -> None:
        """Write this model as a `convserve/1` file (atomically)."""
        write_model_file(path, self.architecture.to_dict(), self.weights)

    # -- compute --------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Run a preprocessed float32 NHWC batch; returns float32 (N, outputs)."""
        if not (  # the usual batch passes these few tests; anything else gets the full check
            type(x) is np.ndarray
            and x.dtype is FLOAT32
            and x.flags.c_contiguous
            and x.shape[1:] == self.architecture.input_shape
            and x.size > 0
        ):
            self._check_batch(x, floating_only=True, what="forward input")
        # copies a non-contiguous batch itself; a NaN or infinity in x raises ModelError
        return self._plan.run(x, check="forward input")

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Classify raw pixels: uint8 or float, (N, H, W, C) or one (H, W, C) image.

        Applies the model's preprocessing `(p * scale - mean) / std`; returns float32
        probabilities (or the last layer's output) of shape (N, outputs).
        """
        single = isinstance(images, np.ndarray) and images.ndim == 3
        self._check_batch(
            images[None] if single else images,
            floating_only=False,
            what="predict input",
            given=images.shape if single else None,
        )
        if single:
            images = images[None]
        # preprocessing runs inside the first kernel; a NaN or infinity raises ModelError
        check = "predict input" if images.dtype.kind == "f" else None
        return self._plan.run(images, preprocess=True, check=check)

    def activations(
        self, images: np.ndarray, layers: list[int] | None = None
    ) -> dict[int, np.ndarray]:
        """Each layer's output for raw pixels (as `predict` takes them): {layer index: array of
        shape (N, *layer output shape)}, for the `layers` given (default all). For inspection
        and figures: it builds extra plans on first use and leaves `predict` as fast as it was."""
        from convserve.core.layer_outputs import LayerOutputs

        single = isinstance(images, np.ndarray) and images.ndim == 3
        batch = images[None] if single else images
        self._check_batch(batch, floating_only=False, what="activations input")
        if batch.dtype.kind == "f" and not all_finite(batch):
            raise ModelError("activations input contains NaN or Inf")
        count = len(self.architecture.layers)
        wanted = list(range(count)) if layers is None else list(layers)
        bad = [
            i for i in wanted if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count
        ]
        if bad:
            raise ModelError(f"activations: layer index {bad[0]!r} outside 0-{count - 1}")
        if getattr(self, "_layer_outputs", None) is None:
            self._layer_outputs = LayerOutputs(self.architecture, self.weights, self._plan.plan)
        return self._layer_outputs(batch, wanted)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Choose the kernel variants (when planning) and compile every kernel the model needs
        (and run each batch size once)."""
        if self._planning:
            from convserve.core.planner import plan_for

            largest = max(self._batch_size, *batch_sizes)  # planning stays within the limits
            chosen, chunk = plan_for(
                self.architecture,
                self.weights,
                self._plan_cache,
                largest_batch=largest,
                chunk=self._plan.chunk,
                parallel_min_batch=self._parallel_min_batch,
            )
            if chosen != self._plan.plan:
                self._plan = InferencePlan(self.architecture, self.weights, chosen, chunk)
                self._layer_outputs = None
            self._plan.chunk = chunk
            self._planning = False  # planned once: later warm-ups keep it
        self._plan.warmup(tuple(batch_sizes))

    def _check_batch(
        self, x: Any, *, floating_only: bool, what: str, given: tuple | None = None
    ) -> None:
        expected = self.input_shape
        if given is not None and given != expected:
            dims = ", ".join(map(str, expected))
            raise ModelError(
                f"{what}: expected one image [{dims}] or a batch [N, {dims}], got {list(given)}"
            )
        if not isinstance(x, np.ndarray):
            raise ModelError(f"{what}: expected a numpy array, got {type(x).__name__}")
        if floating_only and x.dtype != np.float32:
            raise ModelError(f"{what}: dtype is {x.dtype}, expected float32")
        if not floating_only and x.dtype.kind not in "uif" or x.dtype.kind == "b":
            raise ModelError(f"{what}: dtype is {x.dtype}, expected uint8 or a float type")
        if x.ndim != 4:
            raise ModelError(
                f"{what}: expected shape [N, {', '.join(map(str, expected))}], got {list(x.shape)} (rank {x.ndim})"
            )
        if x.shape[1:] != expected:
            raise ModelError(
                f"{what}: expected shape [N, {', '.join(map(str, expected))}], got {list(x.shape)}"
            )
        if x.shape[0] < 1:
            raise ModelError(f"{what}: the batch is empty (shape {list(x.shape)})")

    # -- description ----------------------------------------------------------------------
    def summary(self) -> str:
        """A Keras-like table: layer, output shape, parameters, with totals."""
        return summarize(self.architecture)


def summarize(arch: Architecture) -> str:
    rows = [("Layer (type)", "Output shape", "Param #")]
    rows.append(("input", _shape(arch.input_shape), "0"))
    for layer in arch.layers:
        desc = f"{layer.index}: {layer.type} {layer.describe()}".rstrip()
        rows.append((desc, _shape(layer.output_shape), f"{layer.param_count():,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "-" * (sum(widths) + 6)
    out = [f'Model: "{arch.name}"', line]
    for i, row in enumerate(rows):
        out.append(f"{row[0]:<{widths[0]}}   {row[1]:<{widths[1]}}   {row[2]:>{widths[2]}}")
        if i == 0:
            out.append("=" * len(line))
    total = arch.param_count()
    out += [
        "=" * len(line),
        f"Total params: {total:,} ({total * 4 / 1024:.1f} KiB as float32)",
        f"Input: {_shape(arch.input_shape)}, scale {arch.scale:g}, mean {list(arch.mean)}, std {list(arch.std)}",
        f"Classes: {len(arch.labels)} ({', '.join(arch.labels[:10])}{', ...' if len(arch.labels) > 10 else ''})",
    ]
    return "\n".join(out)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)

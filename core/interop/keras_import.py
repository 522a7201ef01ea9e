"""Keras -> `ModelBuilder`: `.keras` zips (config.json + model.weights.h5) and legacy `.h5` files.

Read with json and h5py only; Keras itself is not needed. Supported layers: InputLayer, Conv2D,
MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, GlobalMaxPooling2D, Flatten, Dense,
Activation, ReLU, Softmax, Dropout (and other inference no-ops), BatchNormalization (folded),
Rescaling and Normalization (the input preprocessing when they come first). A Functional model
is accepted when it is a single chain.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from convserve.core.interop import UnsupportedModel, require
from convserve.core.interop.builder import ModelBuilder

IDENTITY_LAYERS = (
    "Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "ActivityRegularization",
)  # fmt: skip
SUPPORTED = (
    "Conv2D, MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, GlobalMaxPooling2D, Flatten, "
    "Dense, Activation, ReLU, Softmax, Dropout, BatchNormalization, Rescaling, Normalization"
)
POOLS = {"MaxPooling2D": "max_pooling2d", "AveragePooling2D": "average_pooling2d"}
GLOBAL_POOLS = {
    "GlobalMaxPooling2D": "max_pooling2d",
    "GlobalAveragePooling2D": "average_pooling2d",
}
# the order of each class's variables in a .keras weights file
VARIABLES = {
    "Conv2D": ("kernel", "bias"),
    "Dense": ("kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "Normalization": ("mean", "variance", "count"),
}
KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), the floor of Normalization's std


@dataclass
class KerasSource:
    builder: ModelBuilder
    name: str | None
    format: str
    suffix: str  # ".keras" or ".h5", for running the source with Keras


def is_keras_zip(data: bytes) -> bool:
    if not data.startswith(b"PK"):
        return False
    try:
        return "config.json" in zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return False


def import_keras_zip(data: bytes) -> KerasSource:
    """A Keras 3 (or tf.keras 2.13+) `.keras` file."""
    h5py = require("h5py", "importing Keras files")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        config = json.loads(archive.read("config.json"))
        names = archive.namelist()
        meta = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
        if "model.weights.h5" not in names:
            raise UnsupportedModel(
                "Keras file: no model.weights.h5 inside (only HDF5 weights are supported)"
            )
        weights_file = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, EOFError) as exc:
        raise UnsupportedModel(f"Keras file: cannot read the .keras archive: {exc}") from None
    with weights_file:
        store = _ZipWeights(weights_file)
        builder, name = _Converter(config, store).run()
    version = meta.get("keras_version", "?") if isinstance(meta, dict) else "?"
    return KerasSource(builder, name, f"Keras {version} .keras", ".keras")


def import_keras_h5(data: bytes) -> KerasSource:
    """A legacy `.h5` file written by `model.save("x.h5")` (Keras 2 or 3)."""
    h5py = require("h5py", "importing Keras files")
    try:
        handle = h5py.File(io.BytesIO(data), "r")
    except OSError as exc:
        raise UnsupportedModel(f"Keras .h5 file: cannot read: {exc}") from None
    with handle:
        if "model_config" not in handle.attrs:
            raise UnsupportedModel(
                "Keras .h5 file: has no model_config (a weights-only file); save the whole model"
            )
        config = json.loads(_text(handle.attrs["model_config"]))
        if "model_weights" not in handle:
            raise UnsupportedModel("Keras .h5 file: has no model_weights group")
        builder, name = _Converter(config, _LegacyWeights(handle["model_weights"])).run()
        version = _text(handle.attrs.get("keras_version", "?"))
    return KerasSource(builder, name, f"Keras {version} legacy .h5", ".h5")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _snake(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: how a .keras file keys a layer by its class."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


class _ZipWeights:
    """Variables in a .keras `model.weights.h5`: `layers/<key>/vars/<i>`, matched by layer name."""

    def __init__(self, handle: Any):
        root = handle.get("layers") or handle.get("_layer_checkpoint_dependencies")
        self.by_name: dict[str, Any] = {}
        self.by_key: dict[str, Any] = {}
        for key, group in (root or {}).items():
            variables = group.get("vars") if hasattr(group, "get") else None
            if variables is None:
                continue
            self.by_key[key] = variables
            if "name" in variables.attrs:
                self.by_name[_text(variables.attrs["name"])] = variables
        self.seen: dict[str, int] = {}

    def get(
        self, layer_name: str, class_name: str, roles: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        base = _snake(class_name)
        count = self.seen.get(base, 0)
        self.seen[base] = count + 1
        variables = self.by_name.get(layer_name)
        if variables is None:
            variables = self.by_key.get(base if count == 0 else f"{base}_{count}")
        if variables is None:
            return {}
        ordered = sorted(variables.keys(), key=int)
        if len(ordered) > len(roles):
            raise UnsupportedModel(
                f"Keras layer '{layer_name}' ({class_name}): {len(ordered)} weight arrays, "
                f"expected at most {len(roles)}"
            )
        return {role: np.asarray(variables[i]) for role, i in zip(roles, ordered)}


class _LegacyWeights:
    """Variables in a legacy .h5 `model_weights` group, found through `weight_names`."""

    def __init__(self, group: Any):
        self.group = group

    def get(
        self, layer_name: str, class_name: str, roles: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        if layer_name not in self.group:
            return {}
        layer = self.group[layer_name]
        names = [_text(n) for n in layer.attrs.get("weight_names", [])]
        out: dict[str, np.ndarray] = {}
        for name in names:
            role = name.split("/")[-1].split(":")[0]
            out[role] = np.asarray(layer[name])
        return out


class _Converter:
    def __init__(self, config: Any, store: Any):
        if not isinstance(config, dict) or "config" not in config:
            raise UnsupportedModel("Keras file: config.json is not a Keras model config")
        self.config = config
        self.store = store

    def run(self) -> tuple[ModelBuilder, str | None]:
        kind = self.config.get("class_name")
        body = self.config["config"]
        layers = body.get("layers") if isinstance(body, dict) else None
        if kind not in ("Sequential", "Functional", "Model") or not isinstance(layers, list):
            raise UnsupportedModel(
                f"Keras model: class {kind!r} is not supported; a Sequential model or a "
                "single-chain Functional model is"
            )
        if kind != "Sequential":
            self._check_chain(body, layers)
        builder = ModelBuilder(self._input_shape(body, layers))
        for layer in layers:
            self._layer(builder, layer)
        return builder, body.get("name")

    # -- structure ------------------------------------------------------------------------------
    def _input_shape(self, body: dict, layers: list) -> tuple[int, ...]:
        candidates = []
        for layer in layers[:1]:
            cfg = layer.get("config", {})
            candidates += [cfg.get("batch_shape"), cfg.get("batch_input_shape")]
        candidates += [
            body.get("build_input_shape"),
            (self.config.get("build_config") or {}).get("input_shape"),
        ]
        shape = next((s for s in candidates if s), None)
        if (
            not isinstance(shape, list)
            or len(shape) != 4
            or not all(isinstance(v, int) and v > 0 for v in shape[1:])
        ):
            raise UnsupportedModel(
                f"Keras model: needs a static image input [batch, H, W, C], got {shape!r}"
            )
        return tuple(shape[1:])

    def _check_chain(self, body: dict, layers: list) -> None:
        for key in ("input_layers", "output_layers"):
            refs = body.get(key) or []
            if refs and isinstance(refs[0], list):  # [[name, 0, 0], ...] or [name, 0, 0]
                if len(refs) != 1:
                    raise UnsupportedModel(
                        f"Keras model: {len(refs)} {key.split('_')[0]}s; only one-input, "
                        "one-output chains are supported"
                    )
        previous = None
        for layer in layers:
            name = layer.get("config", {}).get("name") or layer.get("name")
            nodes = layer.get("inbound_nodes") or []
            parents = _history(nodes)
            if len(nodes) > 1:
                raise UnsupportedModel(
                    f"Keras layer '{name}' ({layer.get('class_name')}): called {len(nodes)} times "
                    "(shared layer); only sequential models are supported"
                )
            expected = [] if previous is None else [previous]
            if parents != expected:
                raise UnsupportedModel(
                    f"Keras layer '{name}' ({layer.get('class_name')}): inputs {parents}, "
                    f"expected {expected}; only sequential (single-chain) models are supported"
                )
            previous = name

    # -- layers ---------------------------------------------------------------------------------
    def _layer(self, builder: ModelBuilder, layer: dict) -> None:
        kind = layer.get("class_name")
        cfg = layer.get("config") or {}
        name = cfg.get("name", "?")
        where = f"Keras layer '{name}' ({kind})"
        if kind == "InputLayer" or kind in IDENTITY_LAYERS:
            return
        self._check_dtype(where, cfg)
        if cfg.get("data_format", "channels_last") not in ("channels_last", None):
            raise UnsupportedModel(
                f"{where}: data_format={cfg['data_format']} is not supported (channels_last only)"
            )
        if kind in POOLS:
            self._pool(builder, where, cfg, POOLS[kind])
            return
        if kind in GLOBAL_POOLS:
            self._global(builder, where, cfg, GLOBAL_POOLS[kind])
            return
        handler = getattr(self, f"_{kind}", None)
        if handler is None:
            raise UnsupportedModel(f"{where}: unsupported layer; supported: {SUPPORTED}")
        weights = self.store.get(name, kind, VARIABLES.get(kind, ()))
        handler(builder, where, cfg, weights)

    @staticmethod
    def _check_dtype(where: str, cfg: dict) -> None:
        dtype = cfg.get("dtype")
        if isinstance(dtype, dict):
            dtype = (dtype.get("config") or {}).get("name")
        if dtype not in (None, "float32"):
            raise UnsupportedModel(
                f"{where}: dtype policy {dtype!r} is not supported (float32 only)"
            )

    @staticmethod
    def _pair(where: str, cfg: dict, key: str, default: Any = None) -> tuple[int, int]:
        value = cfg.get(key, default)
        if value is None:
            value = default
        if isinstance(value, int):
            value = [value, value]
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and v > 0 for v in value)
        ):
            raise UnsupportedModel(f"{where}: {key}={value!r} is not supported")
        return value[0], value[1]

    @staticmethod
    def _padding(where: str, cfg: dict) -> str:
        padding = cfg.get("padding", "valid")
        if padding not in ("valid", "same"):
            raise UnsupportedModel(f"{where}: padding={padding!r} is not supported (valid, same)")
        return padding

    @staticmethod
    def _activation(where: str, cfg: dict) -> str:
        act = cfg.get("activation", "linear")
        if act is None:
            return "linear"
        if not isinstance(act, str):
            raise UnsupportedModel(f"{where}: a custom activation {act!r} is not supported")
        return act

    @staticmethod
    def _need(where: str, weights: dict, role: str) -> np.ndarray:
        if role not in weights:
            raise UnsupportedModel(f"{where}: weight '{role}' not found in the file")
        value = weights[role]
        if value.dtype != np.float32:
            raise UnsupportedModel(
                f"{where}: weight '{role}' has dtype {value.dtype}; only float32 is supported"
            )
        return value

    def _Conv2D(self, builder: ModelBuilder, where: str, cfg: dict, weights: dict) -> None:
        if self._pair(where, cfg, "dilation_rate", 1) != (1, 1):
            raise UnsupportedModel(
                f"{where}: dilation_rate={cfg['dilation_rate']} (dilated conv) is not supported"
            )
        if cfg.get("groups", 1) != 1:
            raise UnsupportedModel(
                f"{where}: groups={cfg['groups']} (grouped conv) is not supported"
            )
        kernel = self._need(where, weights, "kernel")
        bias = self._need(where, weights, "bias") if cfg.get("use_bias", True) else None
        if kernel.ndim != 4 or list(kernel.shape[:2]) != list(
            self._pair(where, cfg, "kernel_size")
        ):
            raise UnsupportedModel(
                f"{where}: kernel of shape {list(kernel.shape)} does not match kernel_size"
            )
        strides = self._pair(where, cfg, "strides", 1)
        builder.conv(where, kernel, bias, strides, self._padding(where, cfg))
        builder.activation(where, self._activation(where, cfg))

    def _pool(self, builder: ModelBuilder, where: str, cfg: dict, kind: str) -> None:
        size = self._pair(where, cfg, "pool_size", 2)
        strides = self._pair(where, cfg, "strides", list(size))
        builder.pool(where, kind, size, strides, self._padding(where, cfg))

    def _global(self, builder: ModelBuilder, where: str, cfg: dict, kind: str) -> None:
        builder._need_image(where)
        h, w = builder.shape[0], builder.shape[1]
        builder.pool(where, kind, (h, w), (h, w), "valid")
        if not cfg.get("keepdims", False):
            builder.flatten(where)

    def _Flatten(self, builder: ModelBuilder, where: str, cfg: dict, weights: dict) -> None:
        builder.flatten(where)

    def _Dense(self, builder: ModelBuilder, where: str, cfg: dict, weights: dict) -> None:
        kernel = self._need(where, weights, "kernel")
        bias = self._need(where, weights, "bias") if cfg.get("use_bias", True) else None
        if kernel.ndim != 2:
            raise UnsupportedModel(
                f"{where}: kernel of shape {list(kernel.shape)} is not (in, units)"
            )
        builder.dense(where, kernel, bias)
        builder.activation(where, self._activation(where, cfg))

    def _Activation(self, builder: ModelBuilder, where: str, cfg: dict, weights: dict) -> None:
        builder.activation(where, self._activation(where, cfg))

    def _ReLU(self, builder: ModelBuilder, where: str, cfg: dict, weights: dict) -> None:
        for key in ("max_value", "negative_slope", "threshold"):
            if cfg.get(key) not in (None, 0, 0.0):
                raise UnsupportedModel(
                    f"{where}: {key}={cfg[key]} is not supported (plain ReLU only)"
                )
        builder.activation(where, "relu")

    def _Softmax(self, builder: ModelBuilder, where: str, cfg: dict, weights: dict) -> None:
        axis = cfg.get("axis", -1)
        if axis not in (-1, [-1], 1, [1]) or len(builder.shape) != 1:
            raise UnsupportedModel(
                f"{where}: axis={axis}; softmax over the features of a flat vector only"
            )
        builder.activation(where, "softmax")

    def _channel_axis(self, where: str, builder: ModelBuilder, cfg: dict) -> None:
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if axis not in (-1, len(builder.shape)):
            raise UnsupportedModel(
                f"{where}: axis={cfg.get('axis')}; only the channel (last) axis is supported"
            )

    def _BatchNormalization(
        self, builder: ModelBuilder, where: str, cfg: dict, weights: dict
    ) -> None:
        self._channel_axis(where, builder, cfg)
        if cfg.get("renorm"):
            raise UnsupportedModel(f"{where}: renorm=True is not supported")
        roles = [
            r
            for r, on in (("gamma", cfg.get("scale", True)), ("beta", cfg.get("center", True)))
            if on
        ]
        if not isinstance(self.store, _LegacyWeights) and len(roles) < 2:
            # a .keras file numbers variables in creation order: relabel by what exists
            present = [weights[k] for k in VARIABLES["BatchNormalization"] if k in weights]
            weights = dict(zip([*roles, "moving_mean", "moving_variance"], present))
        gamma = self._need(where, weights, "gamma") if "gamma" in roles else None
        beta = self._need(where, weights, "beta") if "beta" in roles else None
        mean = self._need(where, weights, "moving_mean")
        var = self._need(where, weights, "moving_variance")
        builder.batch_norm(where, gamma, beta, mean, var, float(cfg.get("epsilon", 1e-3)))

    def _Rescaling(self, builder: ModelBuilder, where: str, cfg: dict, weights: dict) -> None:
        scale = np.asarray(cfg.get("scale", 1.0), np.float64).reshape(-1)
        offset = np.asarray(cfg.get("offset", 0.0), np.float64).reshape(-1)
        if builder.layers:
            builder.affine(where, scale, offset)
            return
        builder.input_step(where, "multiply", scale)
        if offset.any():
            builder.input_step(where, "add", offset)

    def _Normalization(self, builder: ModelBuilder, where: str, cfg: dict, weights: dict) -> None:
        self._channel_axis(where, builder, cfg)
        if cfg.get("invert"):
            raise UnsupportedModel(f"{where}: invert=True is not supported")
        mean, var = cfg.get("mean"), cfg.get("variance")
        if mean is None or var is None:
            mean, var = self._need(where, weights, "mean"), self._need(where, weights, "variance")
        mean = np.asarray(mean, np.float64).reshape(-1)
        std = np.maximum(np.sqrt(np.asarray(var, np.float64).reshape(-1)), KERAS_EPSILON)
        builder.input_step(where, "add", -mean)
        builder.input_step(where, "divide", std)


def _history(nodes: Any) -> list[str]:
    """Names of the layers feeding a Functional layer (Keras 3 `keras_history` or Keras 2 lists)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if "keras_history" in value:
                found.append(value["keras_history"][0])
                return
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
                found.append(value[0])
                return
            for item in value:
                walk(item)

    walk(nodes)
    return found

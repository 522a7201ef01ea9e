"""ONNX -> `ModelBuilder`: a static walk over a sequential CNN graph, as exporters write it.

Supported (opsets 9-22, default domain): Conv, MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool, Relu, Tanh, Sigmoid, Softmax, Flatten, Reshape (to 2-D), Gemm, MatMul (+ Add),
BatchNormalization, Dropout, Identity, Transpose (NHWC input, H,W,C flatten), Pad (zeros, before
a Conv), and Mul/Add/Sub/Div by constants (input scaling, or folded into the conv/dense before
them). Shape-plumbing subgraphs on constants are evaluated with onnx's reference evaluator.
NCHW graphs become our NHWC: conv kernels are transposed and the first dense after a C,H,W
flatten gets its rows permuted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from convserve.core.interop import UnsupportedModel, require
from convserve.core.interop.builder import ModelBuilder, auto_pads

OPSETS = range(9, 23)
ELEMENTWISE = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid"}
ARITHMETIC = ("Mul", "Add", "Sub", "Div")
# ops evaluated when all their inputs are constants (shape and padding plumbing)
FOLDABLE = {
    "Cast", "Concat", "Constant", "ConstantOfShape", "Div", "Equal", "Expand", "Gather", "Identity",
    "Mul", "Neg", "Range", "Reciprocal", "Reshape", "Shape", "Slice", "Sqrt", "Squeeze", "Sub",
    "Add", "Transpose", "Unsqueeze", "Where",
}  # fmt: skip
SUPPORTED = (
    "Conv, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Relu, Tanh, Sigmoid, Softmax, "
    "Flatten, Reshape, Gemm, MatMul, Add, Sub, Mul, Div, BatchNormalization, Dropout, Identity, "
    "Transpose, Pad"
)
MAX_CONSTANT_ELEMENTS = 50_000_000


@dataclass
class OnnxSource:
    """A parsed ONNX model and what the verifier needs to run it."""

    builder: ModelBuilder
    labels: list[str] | None
    name: str | None
    format: str
    input_nchw: bool
    batch: int | None  # a batch size fixed in the graph input, if any


def load_onnx(data: bytes, where: str = "ONNX model") -> Any:
    onnx = require("onnx", "importing ONNX")
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise UnsupportedModel(f"{where}: not a valid ONNX file ({type(exc).__name__})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise UnsupportedModel(f"{where}: not a valid ONNX file (no graph)")
    return model


def load_onnx_file(path: Path, data: bytes) -> Any:
    """Parse a model file (`data` is its contents) and load any external-data tensors, which
    must be files in the model's own folder (the exporters write `model.onnx.data` there)."""
    onnx = require("onnx", "importing ONNX")
    model = load_onnx(data)
    base = path.resolve().parent
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node for a in n.attribute if a.HasField("t")
    ]
    external = [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (base / location).resolve()
        if not location or not target.is_relative_to(base) or not target.is_file():
            raise UnsupportedModel(
                f"ONNX model: initializer '{tensor.name}' refers to external data {location!r}, "
                f"which is not a file in {base}"
            )
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise UnsupportedModel(f"ONNX model: cannot load external data: {exc}") from None
    return model


def import_onnx(model: Any) -> OnnxSource:
    """Read a parsed ONNX model into a builder; raises `UnsupportedModel` for anything not exact."""
    return _Walker(model).run()


def _label(node: Any) -> str:
    return f"ONNX node '{node.name or (node.output[0] if node.output else '?')}' ({node.op_type})"


class _Walker:
    def __init__(self, model: Any):
        self.onnx = require("onnx", "importing ONNX")
        self.model = model
        self.graph = model.graph
        opsets = {o.domain: o.version for o in model.opset_import}
        self.opset = opsets.get("", opsets.get("ai.onnx"))
        if self.opset not in OPSETS:
            raise UnsupportedModel(
                f"ONNX model: opset {self.opset} is not supported; supported: "
                f"{OPSETS.start}-{OPSETS.stop - 1}"
            )
        self.consts: dict[str, np.ndarray] = {}
        for init in self.graph.initializer:
            self.consts[init.name] = self._initializer(init)
        self.current = ""  # the one data tensor flowing through the chain
        self.layout = "nchw"  # of `current`: nchw / nhwc image, or flat
        self.pending_pads = (0, 0, 0, 0)
        self.builder: ModelBuilder | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def _initializer(self, init: Any) -> np.ndarray:
        if init.data_location == self.onnx.TensorProto.EXTERNAL:
            raise UnsupportedModel(
                f"ONNX model: initializer '{init.name}' uses external data; not supported"
            )
        try:
            return self.onnx.numpy_helper.to_array(init)
        except Exception as exc:
            raise UnsupportedModel(
                f"ONNX model: initializer '{init.name}' is unreadable: {exc}"
            ) from None

    def _graph_input(self) -> tuple[str, list[int | None]]:
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1 or len(self.graph.output) != 1:
            raise UnsupportedModel(
                f"ONNX graph: has {len(inputs)} inputs and {len(self.graph.output)} outputs; "
                "only sequential models with one input and one output are supported"
            )
        value = inputs[0]
        tensor = value.type.tensor_type
        if (
            not value.type.HasField("tensor_type")
            or tensor.elem_type != self.onnx.TensorProto.FLOAT
        ):
            raise UnsupportedModel(
                f"ONNX input '{value.name}': must be a float32 tensor "
                f"(elem_type {tensor.elem_type}); quantized/float16 models are not supported"
            )
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if len(dims) != 4 or any(d is None or d < 1 for d in dims[1:]):
            raise UnsupportedModel(
                f"ONNX input '{value.name}': needs a static image shape [N, C, H, W] or "
                f"[N, H, W, C], got {[d if d is not None else '?' for d in dims]}"
            )
        return value.name, dims

    def _input_is_nhwc(self, name: str) -> bool:
        """Whether the input reaches a Transpose(perm=[0,3,1,2]) through input scaling only."""
        consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for i in node.input:
                consumers.setdefault(i, []).append(node)
        while len(consumers.get(name, [])) == 1:
            node = consumers[name][0]
            if node.op_type == "Transpose":
                return list(self._attrs(node).get("perm", [])) == [0, 3, 1, 2]
            if node.op_type not in (*ARITHMETIC, "Identity", "Dropout") or not node.output:
                return False
            name = node.output[0]
        return False

    # -- walk ---------------------------------------------------------------------------------------
    def run(self) -> OnnxSource:
        name, dims = self._graph_input()
        nhwc = self._input_is_nhwc(name)
        shape = (dims[1], dims[2], dims[3]) if nhwc else (dims[2], dims[3], dims[1])
        self.builder = ModelBuilder(shape)
        self.current, self.layout = name, "nhwc" if nhwc else "nchw"
        for node in self.graph.node:  # name the first unknown op before any other complaint
            known = node.op_type in (*ELEMENTWISE, *ARITHMETIC, *FOLDABLE)
            if not known and not hasattr(self, f"_op_{node.op_type}"):
                raise UnsupportedModel(f"{_label(node)}: unsupported op; supported: {SUPPORTED}")
        self._check_sequential(name)
        known = {name}
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise UnsupportedModel(
                    f"{_label(node)}: custom domain '{node.domain}' is not supported"
                )
            data = [i for i in node.input if i and i not in self.consts]
            undefined = [i for i in data if i not in known]
            if undefined:
                raise UnsupportedModel(
                    f"{_label(node)}: input '{undefined[0]}' is neither an initializer nor the "
                    "output of an earlier node"
                )
            known.update(o for o in node.output if o)
            if node.op_type == "Shape" and data:
                self._shape(node)
            elif not data:
                self._fold(node)
            elif len(data) > 1:
                raise UnsupportedModel(
                    f"{_label(node)}: combines {len(data)} computed tensors (a residual or "
                    "branching graph); only sequential models are supported"
                )
            elif data[0] != self.current:
                raise UnsupportedModel(
                    f"{_label(node)}: reads '{data[0]}', not the chain's current tensor; only "
                    "sequential models are supported"
                )
            else:
                self._layer(node)
        out = self.graph.output[0].name
        if out != self.current:
            raise UnsupportedModel(
                f"ONNX graph: output '{out}' is not the end of the layer chain ('{self.current}')"
            )
        if self.layout != "flat":
            raise UnsupportedModel(
                "ONNX graph: the output is an image tensor; convserve models end with a flat "
                "(classes) vector"
            )
        meta = {p.key: p.value for p in self.model.metadata_props}
        self._exact_preprocessing(meta.get("convserve.input"))
        labels = None
        if "convserve.labels" in meta:
            try:
                labels = json.loads(meta["convserve.labels"])
            except json.JSONDecodeError:
                labels = None
        producer = " ".join(v for v in (self.model.producer_name, self.model.producer_version) if v)
        return OnnxSource(
            builder=self.builder,
            labels=labels if isinstance(labels, list) else None,
            name=meta.get("convserve.name"),
            format=f"ONNX opset {self.opset}" + (f", written by {producer}" if producer else ""),
            input_nchw=not nhwc,
            batch=dims[0],
        )

    def _exact_preprocessing(self, recorded: str | None) -> None:
        """Our exporter records the preprocessing in full precision; the graph holds it in
        float32. Take the recorded values when they are what the graph computes."""
        try:
            spec = json.loads(recorded) if recorded else None
            values = [np.float64(spec["scale"]), np.asarray(spec["mean"], np.float64),
                      np.asarray(spec["std"], np.float64)]  # fmt: skip
        except (json.JSONDecodeError, TypeError, KeyError, ValueError):
            return
        pre = self.builder.pre
        ours = [np.float64(pre.scale), pre.mean, pre.std]
        if all(
            np.shape(a) == np.shape(b) and np.array_equal(np.float32(a), np.float32(b))
            for a, b in zip(values, ours)
        ):
            pre.scale, pre.mean, pre.std = float(values[0]), values[1], values[2]

    def _check_sequential(self, name: str) -> None:
        """Every computed tensor feeds at most one node (Shape reads aside)."""
        data, readers = {name}, {}
        for node in self.graph.node:
            inputs = [i for i in set(node.input) if i in data]
            if node.op_type == "Shape" or not inputs:
                continue
            data.update(o for o in node.output if o)
            for i in inputs:
                readers.setdefault(i, []).append(node)
        for tensor, nodes in readers.items():
            if len(nodes) > 1:
                names = ", ".join(_label(n).removeprefix("ONNX node ") for n in nodes)
                raise UnsupportedModel(
                    f"ONNX graph: tensor '{tensor}' feeds {len(nodes)} nodes ({names}): a branch "
                    "or residual connection; only sequential models are supported"
                )

    # -- constants ------------------------------------------------------------------------------------
    def _fold(self, node: Any) -> None:
        if node.op_type not in FOLDABLE:
            raise UnsupportedModel(f"{_label(node)}: unsupported op on constants")
        feeds = {i: self.consts[i] for i in node.input if i}
        if node.op_type in ("ConstantOfShape", "Expand"):
            shape = feeds[node.input[-1]] if node.input else np.zeros(0)
            if (
                shape.size
                and math.prod(int(max(v, 1)) for v in shape.reshape(-1)) > MAX_CONSTANT_ELEMENTS
            ):
                raise UnsupportedModel(
                    f"{_label(node)}: constant of shape {shape.tolist()} is too large"
                )
        onnx = self.onnx
        helper = onnx.helper
        try:
            ins = [
                helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                for k, v in feeds.items()
            ]
            graph = helper.make_graph(
                [node], "fold", ins, [helper.make_empty_tensor_value_info(o) for o in node.output]
            )
            folded = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
            results = onnx.reference.ReferenceEvaluator(folded).run(None, feeds)
        except Exception as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UnsupportedModel(
                f"{_label(node)}: cannot evaluate on constants: {message}"
            ) from None
        for output, value in zip(node.output, results):
            self.consts[output] = np.asarray(value)

    def _shape(self, node: Any) -> None:
        """Shape of the data tensor, with batch 1 (dynamic-batch flatten chains fold to [1, -1])."""
        h, w, c = self.builder.shape if len(self.builder.shape) == 3 else (0, 0, 0)
        dims = {
            "nchw": [1, c, h, w],
            "nhwc": [1, h, w, c],
            "flat": [1, *self.builder.shape[:1]],
        }[self.layout]
        attrs = self._attrs(node)
        start, end = attrs.get("start", 0), attrs.get("end", len(dims))
        self.consts[node.output[0]] = np.array(dims[start:end], np.int64)

    def _const(self, node: Any, index: int, what: str) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self.consts:
            raise UnsupportedModel(f"{_label(node)}: {what} must be a constant")
        return self.consts[name]

    def _weight(
        self, node: Any, index: int, what: str, rank: int | None = None
    ) -> np.ndarray | None:
        value = self._const(node, index, what)
        if value is None:
            return None
        if value.dtype != np.float32:
            raise UnsupportedModel(
                f"{_label(node)}: {what} has dtype {value.dtype}; only float32 is supported"
            )
        if rank is not None and value.ndim != rank:
            raise UnsupportedModel(f"{_label(node)}: {what} has rank {value.ndim}, expected {rank}")
        return value

    def _attrs(self, node: Any) -> dict[str, Any]:
        helper = self.onnx.helper
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    # -- layers ---------------------------------------------------------------------------------------
    def _layer(self, node: Any) -> None:
        op = node.op_type
        where = _label(node)
        if any(self.pending_pads) and op != "Conv":
            raise UnsupportedModel(
                f"{where}: follows a Pad; zero padding is only supported right before a Conv"
            )
        handler = getattr(self, f"_op_{op}", None)
        if op in ELEMENTWISE:
            self.builder.activation(where, ELEMENTWISE[op])
        elif op in ARITHMETIC:
            self._arithmetic(node, where)
        elif handler is None:
            raise UnsupportedModel(f"{where}: unsupported op; supported: {SUPPORTED}")
        else:
            if self.layout == "nhwc" and op not in (
                "Transpose",
                "Flatten",
                "Reshape",
                "Identity",
                "Dropout",
            ):
                raise UnsupportedModel(
                    f"{where}: runs on a channels-last (NHWC) tensor; only Flatten/Reshape or a "
                    "Transpose back to NCHW may follow a Transpose to NHWC"
                )
            handler(node, where, self._attrs(node))
        extra = [o for o in node.output[1:] if o and self._used(o)]
        if extra:
            raise UnsupportedModel(
                f"{where}: output '{extra[0]}' is used; only the main output is supported"
            )
        self.current = node.output[0]

    def _used(self, name: str) -> bool:
        return any(name in n.input for n in self.graph.node) or any(
            o.name == name for o in self.graph.output
        )

    def _op_Identity(self, node: Any, where: str, attrs: dict) -> None:
        pass

    def _op_Dropout(self, node: Any, where: str, attrs: dict) -> None:
        training = self._const(node, 2, "training_mode")
        if training is not None and bool(np.asarray(training).reshape(-1)[0]):
            raise UnsupportedModel(
                f"{where}: training_mode=1 (dropout active at inference) is not supported"
            )

    def _op_Cast(self, node: Any, where: str, attrs: dict) -> None:
        if attrs.get("to") != self.onnx.TensorProto.FLOAT:
            raise UnsupportedModel(f"{where}: to={attrs.get('to')}; only float32 is supported")

    def _op_Transpose(self, node: Any, where: str, attrs: dict) -> None:
        perm = list(attrs.get("perm", []))
        if self.layout == "nhwc" and perm == [0, 3, 1, 2]:
            self.layout = "nchw"
        elif self.layout == "nchw" and perm == [0, 2, 3, 1]:
            self.layout = "nhwc"
        else:
            raise UnsupportedModel(
                f"{where}: perm={perm} on a {self.layout} tensor is not supported; supported: "
                "[0,3,1,2] at an NHWC input, [0,2,3,1] before a flatten"
            )

    def _pads(
        self, where: str, attrs: dict, window: tuple[int, int], strides: tuple[int, int]
    ) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) from `pads` / `auto_pad`, plus a preceding Pad."""
        mode = attrs.get("auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        h, w = self.builder.shape[0], self.builder.shape[1]
        pre = self.pending_pads
        self.pending_pads = (0, 0, 0, 0)
        if mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
            top, bottom = auto_pads(h + pre[0] + pre[1], window[0], strides[0], mode)
            left, right = auto_pads(w + pre[2] + pre[3], window[1], strides[1], mode)
        elif mode == "NOTSET":
            pads = [int(v) for v in attrs.get("pads", [0, 0, 0, 0])]
            if len(pads) != 4 or min(pads) < 0:
                raise UnsupportedModel(f"{where}: pads={pads} is not supported (4 values >= 0)")
            top, left, bottom, right = pads
        else:
            raise UnsupportedModel(f"{where}: auto_pad={mode} is not supported")
        return top + pre[0], bottom + pre[1], left + pre[2], right + pre[3]

    def _window_attrs(
        self, where: str, attrs: dict, kernel: list[int] | None
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        kernel = list(attrs.get("kernel_shape", kernel or []))
        strides = list(attrs.get("strides", [1, 1]))
        dilations = list(attrs.get("dilations", [1, 1]))
        if len(kernel) != 2 or len(strides) != 2:
            raise UnsupportedModel(
                f"{where}: kernel_shape={kernel} strides={strides}; only 2-D windows are supported"
            )
        if dilations != [1, 1]:
            raise UnsupportedModel(
                f"{where}: dilations={dilations} (dilated window) is not supported"
            )
        if min(strides) < 1 or min(kernel) < 1:
            raise UnsupportedModel(
                f"{where}: kernel_shape={kernel} strides={strides} must be positive"
            )
        return (kernel[0], kernel[1]), (strides[0], strides[1])

    def _op_Conv(self, node: Any, where: str, attrs: dict) -> None:
        weight = self._weight(node, 1, "weight W", rank=4)
        bias = self._weight(node, 2, "bias B", rank=1)
        if attrs.get("group", 1) != 1:
            raise UnsupportedModel(
                f"{where}: group={attrs['group']} (grouped/depthwise conv) is not supported"
            )
        window, strides = self._window_attrs(where, attrs, list(weight.shape[2:]))
        if list(window) != list(weight.shape[2:]):
            raise UnsupportedModel(
                f"{where}: kernel_shape={list(window)} differs from W's {list(weight.shape[2:])}"
            )
        pads = self._pads(where, attrs, window, strides)
        self.builder.conv(where, weight.transpose(2, 3, 1, 0), bias, strides, pads)

    def _pool(self, node: Any, where: str, attrs: dict, kind: str) -> None:
        window, strides = self._window_attrs(where, attrs, None)
        pads = self._pads(where, attrs, window, strides)
        self.builder.pool(
            where,
            kind,
            window,
            strides,
            pads,
            ceil_mode=bool(attrs.get("ceil_mode", 0)),
            count_include_pad=bool(attrs.get("count_include_pad", 0)),
        )

    def _op_MaxPool(self, node: Any, where: str, attrs: dict) -> None:
        self._pool(node, where, attrs, "max_pooling2d")

    def _op_AveragePool(self, node: Any, where: str, attrs: dict) -> None:
        self._pool(node, where, attrs, "average_pooling2d")

    def _global(self, where: str, kind: str) -> None:
        h, w = self.builder.shape[0], self.builder.shape[1]
        self.builder.pool(where, kind, (h, w), (h, w), "valid")

    def _op_GlobalAveragePool(self, node: Any, where: str, attrs: dict) -> None:
        self._global(where, "average_pooling2d")

    def _op_GlobalMaxPool(self, node: Any, where: str, attrs: dict) -> None:
        self._global(where, "max_pooling2d")

    def _op_Pad(self, node: Any, where: str, attrs: dict) -> None:
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode != "constant":
            raise UnsupportedModel(f"{where}: mode={mode} is not supported (zero padding only)")
        if self.opset < 11:
            pads, value = attrs.get("pads", []), attrs.get("value", 0.0)
        else:
            pads = self._const(node, 1, "pads")
            value = self._const(node, 2, "constant_value")
            if self._const(node, 3, "axes") is not None:
                raise UnsupportedModel(f"{where}: the axes input is not supported")
            pads = [] if pads is None else pads.reshape(-1).tolist()
            value = 0.0 if value is None else float(np.asarray(value).reshape(-1)[0])
        if value != 0:
            raise UnsupportedModel(
                f"{where}: constant_value={value} is not supported (zero padding only)"
            )
        pads = [int(v) for v in pads]
        if (
            self.layout != "nchw"
            or len(pads) != 8
            or min(pads) < 0
            or any(pads[i] for i in (0, 1, 4, 5))
        ):
            raise UnsupportedModel(
                f"{where}: pads={pads}; only non-negative H/W padding of an NCHW image is supported"
            )
        self.pending_pads = (pads[2], pads[6], pads[3], pads[7])

    def _op_Flatten(self, node: Any, where: str, attrs: dict) -> None:
        axis = attrs.get("axis", 1)
        rank = 2 if self.layout == "flat" else 4
        if axis < 0:
            axis += rank
        if axis != 1:
            raise UnsupportedModel(
                f"{where}: axis={attrs.get('axis')} is not supported (axis 1 only)"
            )
        self._flatten(where)

    def _flatten(self, where: str) -> None:
        if self.layout != "flat":
            self.builder.flatten(where, channels_first=self.layout == "nchw")
            self.layout = "flat"

    def _op_Reshape(self, node: Any, where: str, attrs: dict) -> None:
        target = self._const(node, 1, "shape")
        target = attrs.get("shape", []) if target is None else target.reshape(-1).tolist()
        target = [int(v) for v in target]
        features = math.prod(self.builder.shape)
        if attrs.get("allowzero", 0) and 0 in target:
            raise UnsupportedModel(
                f"{where}: allowzero=1 with a 0 in target {target} is not supported"
            )
        if len(target) == 2 and target[1] == 0:  # 0 copies the input's dim 1
            dims = self.builder.shape
            target[1] = {"nchw": dims[-1], "nhwc": dims[0], "flat": features}[self.layout]
        ok = len(target) == 2 and (target[1] == features or (target[1] == -1 and target[0] != -1))
        if not ok:
            raise UnsupportedModel(
                f"{where}: target shape {target} is not a flatten to [N, {features}]"
            )
        self._flatten(where)

    def _op_Gemm(self, node: Any, where: str, attrs: dict) -> None:
        if self.layout != "flat":
            raise UnsupportedModel(f"{where}: input is an image; flatten first")
        if attrs.get("transA", 0):
            raise UnsupportedModel(f"{where}: transA=1 is not supported")
        weight = self._weight(node, 1, "B", rank=2)
        bias = self._weight(node, 2, "C")
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        kernel = weight.T if attrs.get("transB", 0) else weight
        if alpha != 1.0:
            kernel = (kernel.astype(np.float64) * alpha).astype(np.float32)
        if bias is not None:
            units = kernel.shape[1]
            if (
                bias.size not in (1, units)
                or (bias.ndim == 2 and bias.shape[0] != 1)
                or bias.ndim > 2
            ):
                raise UnsupportedModel(
                    f"{where}: C of shape {list(bias.shape)} is not a per-unit bias"
                )
            bias = np.broadcast_to(bias.reshape(-1), (units,)).astype(np.float64) * beta
            bias = bias.astype(np.float32)
        self.builder.dense(where, np.ascontiguousarray(kernel), bias)

    def _op_MatMul(self, node: Any, where: str, attrs: dict) -> None:
        if self.layout != "flat" or node.input[0] != self.current:
            raise UnsupportedModel(
                f"{where}: only flat input @ constant (in, out) weight is supported"
            )
        self.builder.dense(where, self._weight(node, 1, "B", rank=2), None)

    def _op_BatchNormalization(self, node: Any, where: str, attrs: dict) -> None:
        if attrs.get("training_mode", 0):
            raise UnsupportedModel(f"{where}: training_mode=1 is not supported")
        if not attrs.get("spatial", 1):
            raise UnsupportedModel(f"{where}: spatial=0 is not supported")
        gamma, beta, mean, var = (self._weight(node, i, n, rank=1) for i, n in
                                  enumerate(("scale", "B", "mean", "var"), start=1))  # fmt: skip
        channels = self.builder.shape[-1]
        if any(v.shape != (channels,) for v in (gamma, beta, mean, var)):
            raise UnsupportedModel(
                f"{where}: parameters must have {channels} values (one per channel)"
            )
        self.builder.batch_norm(where, gamma, beta, mean, var, float(attrs.get("epsilon", 1e-5)))

    def _op_Softmax(self, node: Any, where: str, attrs: dict) -> None:
        axis = attrs.get("axis", 1 if self.opset < 13 else -1)
        if self.layout != "flat" or axis not in (1, -1):
            raise UnsupportedModel(
                f"{where}: axis={axis} on a {'rank-2' if self.layout == 'flat' else 'rank-4'} "
                "tensor is not supported; softmax must be over the features of a flat vector"
            )
        self.builder.activation(where, "softmax")

    def _arithmetic(self, node: Any, where: str) -> None:
        """Mul/Add/Sub/Div of the data and a per-channel constant."""
        op = node.op_type
        data_first = node.input[0] == self.current
        const = self.consts[node.input[1] if data_first else node.input[0]]
        if not data_first and op in ("Sub", "Div"):
            raise UnsupportedModel(
                f"{where}: constant {op} data is not supported (data {op} constant only)"
            )
        if const.dtype != np.float32:
            raise UnsupportedModel(
                f"{where}: constant has dtype {const.dtype}; only float32 is supported"
            )
        per_channel = self._per_channel(where, const)
        if not self.builder.layers:
            step = {"Mul": "multiply", "Div": "divide", "Add": "add", "Sub": "add"}[op]
            self.builder.input_step(where, step, -per_channel if op == "Sub" else per_channel)
            return
        ones, zeros = np.ones_like(per_channel), np.zeros_like(per_channel)
        scale, shift = {
            "Mul": (per_channel, zeros),
            "Div": (1.0 / per_channel, zeros),
            "Add": (ones, per_channel),
            "Sub": (ones, -per_channel),
        }[op]
        self.builder.affine(where, scale, shift)

    def _per_channel(self, where: str, const: np.ndarray) -> np.ndarray:
        """The constant as one value or one per channel, if it broadcasts only along channels."""
        channels = self.builder.shape[-1]
        rank = 2 if self.layout == "flat" else 4
        if const.ndim > rank:
            raise UnsupportedModel(
                f"{where}: constant of shape {list(const.shape)} does not broadcast per channel"
            )
        shape = [1] * (rank - const.ndim) + list(const.shape)
        axis = {"nchw": 1, "nhwc": 3, "flat": 1}[self.layout]
        if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (
            1,
            channels,
        ):
            raise UnsupportedModel(
                f"{where}: constant of shape {list(const.shape)} is not one value or one per channel"
            )
        return const.reshape(-1).astype(np.float64)

"""`convserve/1` -> ONNX: a standard graph ONNX Runtime (or any ONNX runtime) runs.

The graph keeps our semantics exactly: explicit pads equal to our `valid`/`same` arithmetic,
`count_include_pad=0` for average pooling, a transpose to H,W,C before the flatten so the dense
weights are ours unchanged. With `layout="nhwc"` (the default, our serving layout) the input is
`[N, H, W, C]` and a Transpose to NCHW comes first; with `"nchw"` the input is `[N, C, H, W]`.
With `preprocess=True` the input is raw pixels and the graph starts with our
`(p * scale - mean) / std`; labels and the model name travel in `metadata_props`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from convserve.core.interop import require

ACTIVATION_OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softmax": "Softmax"}
OPSET = 17
IR_VERSION = 9  # onnx writes a newer IR than some runtimes load; 9 is what opset 17 needs


class _Graph:
    """Nodes and initializers with fresh tensor names."""

    def __init__(self, helper: Any, numpy_helper: Any):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        tensor = self.numpy_helper.from_array(
            np.ascontiguousarray(value, np.float32), self.fresh(prefix)
        )
        self.inits.append(tensor)
        return tensor.name

    def node(self, op: str, inputs: list[str], prefix: str, **attrs: Any) -> str:
        out = self.fresh(prefix)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def activation(self, name: str, x: str) -> str:
        if name == "linear":
            return x
        attrs = {"axis": 1} if name == "softmax" else {}
        return self.node(ACTIVATION_OPS[name], [x], name, **attrs)


def onnx_model(
    doc: dict[str, Any],
    weights: dict[str, np.ndarray],
    opset: int = OPSET,
    *,
    layout: str = "nhwc",
    preprocess: bool = False,
) -> bytes:
    """The model as serialized ONNX: input `input` float32, output `output` float32 (N, outputs).

    Without `preprocess` the input is already preprocessed (what `Model.forward` takes)."""
    onnx = require("onnx", "exporting to ONNX")
    from convserve.core.architecture import parse_architecture

    if layout not in ("nhwc", "nchw"):
        raise ValueError(f"layout must be 'nhwc' or 'nchw', got {layout!r}")
    helper = onnx.helper
    arch = parse_architecture(doc)
    g = _Graph(helper, onnx.numpy_helper)
    h, w, c = arch.input_shape
    cur, nchw = "input", layout == "nchw"
    if preprocess:
        cur = _preprocess(g, arch, cur, nchw)
    if not nchw:
        cur, nchw = g.node("Transpose", [cur], "nchw", perm=[0, 3, 1, 2]), True
    for layer in arch.layers:
        prefix = f"layers.{layer.index}"
        top, bottom, left, right = layer.pads
        window = {"strides": list(layer.strides), "pads": [top, left, bottom, right]}
        if layer.type == "conv2d":
            inputs = [cur, g.const("W", weights[f"{prefix}.kernel"].transpose(3, 2, 0, 1))]
            if layer.use_bias:
                inputs.append(g.const("B", weights[f"{prefix}.bias"]))
            cur = g.node("Conv", inputs, "conv", kernel_shape=list(layer.kernel_size), **window)
            cur = g.activation(layer.activation, cur)
        elif layer.type == "max_pooling2d":
            cur = g.node("MaxPool", [cur], "pool", kernel_shape=list(layer.pool_size), **window)
        elif layer.type == "average_pooling2d":
            cur = g.node(
                "AveragePool", [cur], "pool", kernel_shape=list(layer.pool_size),
                count_include_pad=0, **window,
            )  # fmt: skip
        elif layer.type == "flatten":
            if nchw:  # ours flattens H, W, C
                cur, nchw = g.node("Transpose", [cur], "nhwc", perm=[0, 2, 3, 1]), False
            cur = g.node("Flatten", [cur], "flat", axis=1)
        elif layer.type == "dense":
            inputs = [cur, g.const("W", weights[f"{prefix}.kernel"])]
            if layer.use_bias:
                inputs.append(g.const("B", weights[f"{prefix}.bias"]))
            cur = g.activation(layer.activation, g.node("Gemm", inputs, "dense"))
        elif layer.type == "activation":  # elementwise, or softmax over a flat vector
            cur = g.activation(layer.activation, cur)
    g.nodes.append(helper.make_node("Identity", [cur], ["output"], name="output"))
    shape = ["N", c, h, w] if layout == "nchw" else ["N", h, w, c]
    graph = helper.make_graph(
        g.nodes,
        arch.name,
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", arch.num_outputs])],
        g.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="convserve"
    )
    model.ir_version = min(model.ir_version, IR_VERSION)
    props = {
        "convserve.name": arch.name,
        "convserve.labels": json.dumps(list(arch.labels)),
        "convserve.layout": layout,
        "convserve.preprocessed": "true" if preprocess else "false",
    }
    if preprocess:  # full precision of what the graph holds as float32 (an import takes it back)
        props["convserve.input"] = json.dumps(
            {"scale": arch.scale, "mean": list(arch.mean), "std": list(arch.std)}
        )
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _preprocess(g: _Graph, arch: Any, x: str, nchw: bool) -> str:
    """`(x * scale - mean) / std` as Mul, Sub, Div (each left out when it is the identity)."""
    channels = arch.input_shape[2]
    shape = (channels, 1, 1) if nchw else (channels,)
    if arch.scale != 1.0:
        x = g.node("Mul", [x, g.const("scale", np.array(arch.scale))], "scale")
    if any(arch.mean):
        x = g.node("Sub", [x, g.const("mean", np.reshape(arch.mean, shape))], "mean")
    if any(v != 1.0 for v in arch.std):
        x = g.node("Div", [x, g.const("std", np.reshape(arch.std, shape))], "std")
    return x

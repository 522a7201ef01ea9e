"""Training kernels: every backward pass against central finite differences (float64, randomized
shapes), forward passes against plain-NumPy references (conv and pooling written here, the
activations from reference_numpy), optimizers against their textbook update rules, and the
trainable network against the inference `Model`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from convserve.core import Model
from convserve.core.architecture import parse_architecture, same_padding
from convserve.core.training import kernels as K
from convserve.core.training.network import Network
from convserve.core.training.optim import SGD, Adam
from convserve.core.training.schedule import Schedule

from tests.reference_numpy import activation as ref_activation

EPS = 1e-6


def softmax_cross_entropy(logits, labels):
    """The training kernel's fused loss: mean loss, correct argmax count, d(mean loss)/d(logits)."""
    logits = np.ascontiguousarray(logits)
    dlogits = np.empty_like(logits)
    total, correct = K.softmax_cross_entropy(
        logits, np.ascontiguousarray(labels, np.int64), dlogits
    )
    return total / len(logits), int(correct), dlogits


# ----------------------------------------------------------------------------- NumPy reference
def _pad(x, layer, fill):
    top, bottom, left, right = layer.pads
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)


def ref_conv(x, kernel, bias, layer):
    """Direct loop over kernel offsets; kernel in Keras layout (KH, KW, CI, CO)."""
    xp = _pad(x, layer, 0.0)
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    oh, ow, co = layer.output_shape
    out = np.zeros((x.shape[0], oh, ow, co))
    for ky in range(kh):
        for kx in range(kw):
            window = xp[:, ky : ky + oh * sh : sh, kx : kx + ow * sw : sw, :]
            out += window @ kernel[ky, kx]
    return out + (bias if bias is not None else 0)


def ref_pool(x, layer, kind):
    xp = _pad(x, layer, -np.inf if kind == "max" else 0.0)
    ones = _pad(np.ones_like(x), layer, 0.0)
    ph, pw = layer.pool_size
    sh, sw = layer.strides
    oh, ow, _ = layer.output_shape
    acc = np.full((x.shape[0], oh, ow, x.shape[3]), -np.inf if kind == "max" else 0.0)
    count = np.zeros_like(acc)
    for ky in range(ph):
        for kx in range(pw):
            window = xp[:, ky : ky + oh * sh : sh, kx : kx + ow * sw : sw, :]
            if kind == "max":
                acc = np.maximum(acc, window)
            else:
                acc += window
                count += ones[:, ky : ky + oh * sh : sh, kx : kx + ow * sw : sw, :]
    return acc if kind == "max" else acc / count


# ----------------------------------------------------------------------------- helpers
def _layer_net(input_shape, layer_doc, rng):
    """A float64 network whose first layer is `layer_doc` (plus a flatten when needed)."""
    layers = [layer_doc] + ([{"type": "flatten"}] if len(input_shape) == 3 else [])
    arch = parse_architecture(
        {"name": "t", "input": {"shape": list(input_shape)}, "layers": layers}
    )
    net = Network(arch, np.float64)
    net.initialize(rng)
    net.params[:] += rng.normal(0, 0.3, net.size)
    return net, net.layers[0]


def _numeric_gradient(values, loss):
    """Central differences of `loss()` for every element of `values`, which is changed in place
    (it must be contiguous, so that its flat view writes through) and restored."""
    flat = values.reshape(-1)
    assert np.shares_memory(flat, values)
    numeric = np.zeros(flat.size)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + EPS
        plus = loss()
        flat[i] = old - EPS
        minus = loss()
        flat[i] = old
        numeric[i] = (plus - minus) / (2 * EPS)
    return numeric.reshape(values.shape)


def _check_layer(layer, net, x, rng, *, forward_kwargs=None, fresh_rng=None):
    """Finite differences of L = sum(forward(x) * R) against backward, for dx and every parameter."""
    kw = forward_kwargs or {}

    def run(inp):
        if fresh_rng is not None:
            kw["rng"] = fresh_rng()
        out, cache = layer.forward(np.ascontiguousarray(inp), **kw)
        return out.copy(), cache

    out, cache = run(x)
    weights = rng.normal(size=out.shape)
    dx, grads = layer.backward(weights.copy(), cache, need_dx=True)
    grads = {k: v.copy() for k, v in grads.items()}

    def loss():
        return float(np.sum(run(x)[0] * weights))

    np.testing.assert_allclose(dx, _numeric_gradient(x, loss), rtol=1e-5, atol=1e-7)
    for name, param in layer.params.items():
        num = _numeric_gradient(param, loss)
        np.testing.assert_allclose(grads[name], num, rtol=1e-5, atol=1e-7, err_msg=name)
    return out


def _random_window(rng, size_h, size_w):
    return [int(rng.integers(1, min(4, size_h) + 1)), int(rng.integers(1, min(4, size_w) + 1))]


# ----------------------------------------------------------------------------- conv2d
@pytest.mark.parametrize("path", ["generic", "small"])
@pytest.mark.parametrize("seed", range(4))
def test_conv2d_forward_and_backward(seed, path):
    rng = np.random.default_rng(100 + seed)
    h, w, ci = int(rng.integers(4, 8)), int(rng.integers(4, 8)), int(rng.integers(1, 4))
    layer_doc = {
        "type": "conv2d",
        "filters": int(rng.integers(1, 8)),
        "kernel_size": _random_window(rng, h, w),
        "strides": [int(rng.integers(1, 4)), int(rng.integers(1, 4))],
        "padding": ["valid", "same"][seed % 2],
        "activation": ["linear", "relu", "tanh", "sigmoid"][seed],
        "use_bias": seed != 3,
    }
    net, layer = _layer_net((h, w, ci), layer_doc, rng)
    layer.SMALL_K = 10**6 if path == "small" else 0
    x = rng.normal(size=(2, h, w, ci))
    out = _check_layer(layer, net, x, rng)
    kh, kw = layer.spec.kernel_size
    kernel = layer.params["kernel"].T.reshape(
        kh, kw, ci, layer.spec.filters
    )  # float64, Keras layout
    ref = ref_conv(x, kernel, layer.params.get("bias"), layer.spec)
    np.testing.assert_allclose(
        out, ref_activation(ref, layer_doc["activation"]), rtol=1e-10, atol=1e-12
    )


# ----------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("kind", ["max", "average"])
@pytest.mark.parametrize("seed", range(4))
def test_pooling_forward_and_backward(kind, seed):
    rng = np.random.default_rng(200 + seed)
    h, w, c = int(rng.integers(3, 8)), int(rng.integers(3, 8)), int(rng.integers(1, 4))
    layer_doc = {
        "type": f"{kind}_pooling2d",
        "pool_size": _random_window(rng, h, w),
        "strides": [int(rng.integers(1, 4)), int(rng.integers(1, 4))],
        "padding": ["valid", "same"][seed % 2],
    }
    net, layer = _layer_net((h, w, c), layer_doc, rng)
    x = rng.normal(size=(3, h, w, c))  # continuous values: no ties in the max
    out = _check_layer(layer, net, x, rng)
    np.testing.assert_allclose(out, ref_pool(x, layer.spec, kind), rtol=1e-12)


def test_average_pooling_same_counts_only_real_cells():
    arch = parse_architecture(
        {
            "input": {"shape": [3, 3, 1]},
            "layers": [
                {
                    "type": "average_pooling2d",
                    "pool_size": [2, 2],
                    "strides": [2, 2],
                    "padding": "same",
                },
                {"type": "flatten"},
            ],
        }
    )
    net = Network(arch, np.float64)
    x = np.arange(9, dtype=np.float64).reshape(1, 3, 3, 1)
    out, _ = net.layers[0].forward(x)
    # windows: {0,1,3,4}, {2,5}, {6,7}, {8}
    np.testing.assert_allclose(out.reshape(-1), [2.0, 3.5, 6.5, 8.0])


# ----------------------------------------------------------------------------- conv + relu + maxpool, fused
@pytest.mark.parametrize("path", ["generic", "small"])
@pytest.mark.parametrize("seed", range(5))
def test_fused_conv_pool_backward(seed, path):
    rng = np.random.default_rng(300 + seed)
    h, w, ci = int(rng.integers(6, 10)), int(rng.integers(6, 10)), int(rng.integers(1, 4))
    pool = {
        "type": "max_pooling2d",
        "pool_size": _random_window(rng, 3, 3),
        "strides": [int(rng.integers(1, 3)), int(rng.integers(1, 3))],
        "padding": ["valid", "same", "valid"][seed % 3],
    }
    if seed >= 3:  # windows tiling the conv output: the fused forward kernel runs too
        pool = {"type": "max_pooling2d", "pool_size": [2, 3 - seed % 2], "padding": "valid"}
    arch = parse_architecture(
        {
            "input": {"shape": [h, w, ci]},
            "labels": ["a", "b", "c"],
            "layers": [
                {
                    "type": "conv2d",
                    "filters": 3,
                    "kernel_size": [2, 2],
                    "activation": "linear",
                },  # gives layer 1 a dx
                {
                    "type": "conv2d",
                    "filters": int(rng.integers(2, 7)),
                    "kernel_size": _random_window(rng, 3, 3),
                    "strides": [1, int(rng.integers(1, 3))],
                    "padding": "same",
                    "activation": ["relu", "linear"][seed % 2],
                },
                pool,
                {"type": "flatten"},
                {"type": "dense", "units": 3, "activation": "softmax"},
            ],
        }
    )
    net = Network(arch, np.float64)
    net.initialize(rng)
    net.layers[1].SMALL_K = 10**6 if path == "small" else 0
    x = rng.normal(size=(3, h, w, ci))
    labels = rng.integers(0, 3, 3)

    def loss():
        out, _ = net.forward(x)
        return softmax_cross_entropy(out, labels)[0]

    net.loss_and_grad(x, labels)
    fused = net.grads.copy()
    out, caches = net.forward(x, fuse=False)
    _, _, dlogits = softmax_cross_entropy(out, labels)
    net.backward(dlogits, caches, fuse=False)
    np.testing.assert_allclose(fused, net.grads, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        net.forward(x)[0], out, rtol=1e-12
    )  # fused forward (when the pool tiles)
    numeric = _numeric_gradient(net.params, loss)
    np.testing.assert_allclose(fused, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "padding,activation", [("valid", "relu"), ("same", "relu"), ("same", "linear")]
)
def test_first_layer_scalar_patch_kernels(padding, activation):
    """1-channel 3x3 conv + 2x2 pool (the reference model's first layer) has its own kernels."""
    rng = np.random.default_rng(350 + len(padding) + len(activation))
    arch = parse_architecture(
        {
            "input": {"shape": [9, 8, 1]},
            "labels": ["a", "b", "c"],
            "layers": [
                {
                    "type": "conv2d",
                    "filters": 6,
                    "kernel_size": [3, 3],
                    "padding": padding,
                    "activation": activation,
                },
                {"type": "max_pooling2d", "pool_size": [2, 2]},
                {"type": "flatten"},
                {"type": "dense", "units": 3, "activation": "softmax"},
            ],
        }
    )
    net = Network(arch, np.float64)
    net.initialize(rng)
    net.params[:] += rng.normal(0, 0.1, net.size)
    assert net.layers[0].spec.first_layer_special(net.layers[1].spec)
    x = rng.normal(size=(3, 9, 8, 1))
    labels = rng.integers(0, 3, 3)
    fused_out, caches = net.forward(x)
    plain_out, plain_caches = net.forward(x, fuse=False)
    np.testing.assert_allclose(fused_out, plain_out, rtol=1e-12)
    np.testing.assert_array_equal(caches[0][1][1], plain_caches[0][1][1])  # same pool winners
    _, _, dlogits = softmax_cross_entropy(fused_out, labels)
    net.backward(dlogits, caches)
    fused = net.grads.copy()
    net.backward(dlogits, plain_caches, fuse=False)
    np.testing.assert_allclose(fused, net.grads, rtol=1e-10, atol=1e-14)

    def loss():
        return softmax_cross_entropy(net.forward(x)[0], labels)[0]

    numeric = _numeric_gradient(net.params, loss)
    np.testing.assert_allclose(fused, numeric, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- dense, activations, dropout
@pytest.mark.parametrize("activation", ["linear", "relu", "tanh", "sigmoid", "softmax"])
def test_dense_forward_and_backward(activation):
    rng = np.random.default_rng(400 + len(activation))
    features, units = int(rng.integers(1, 12)), int(rng.integers(1, 11))
    arch = parse_architecture(
        {
            "input": {"shape": [1, 1, features]},
            "layers": [
                {"type": "flatten"},
                {
                    "type": "dense",
                    "units": units,
                    "activation": activation,
                    "use_bias": activation != "tanh",
                },
                {"type": "dense", "units": 2},
            ],
        }
    )
    net = Network(arch, np.float64)
    net.initialize(rng)
    net.params[:] += rng.normal(0, 0.3, net.size)
    layer = net.layers[1]
    x = rng.normal(size=(int(rng.integers(1, 7)), features))
    out = _check_layer(layer, net, x, rng)
    ref = x @ layer.params["kernel"].T + layer.params.get("bias", 0)
    np.testing.assert_allclose(out, ref_activation(ref, activation), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", ["linear", "relu", "tanh", "sigmoid", "softmax"])
def test_activation_layer(activation):
    rng = np.random.default_rng(500 + len(activation))
    arch = parse_architecture(
        {
            "input": {"shape": [1, 1, 7]},
            "layers": [
                {"type": "flatten"},
                {"type": "activation", "activation": activation},
                {"type": "dense", "units": 2},
            ],
        }
    )
    net = Network(arch, np.float64)
    layer = net.layers[1]
    x = rng.normal(size=(4, 7))
    out = _check_layer(layer, net, x, rng)
    np.testing.assert_allclose(out, ref_activation(x, activation), rtol=1e-12)


def test_dropout_backward_and_scaling():
    rng = np.random.default_rng(600)
    arch = parse_architecture(
        {
            "input": {"shape": [2, 3, 4]},
            "layers": [{"type": "dropout", "rate": 0.4}, {"type": "flatten"}],
        }
    )
    net = Network(arch, np.float64)
    layer = net.layers[0]
    x = rng.normal(size=(5, 2, 3, 4))
    out = _check_layer(layer, net, x, rng, fresh_rng=lambda: np.random.default_rng(7))
    kept = out != 0
    assert 0.3 < kept.mean() < 0.9
    np.testing.assert_allclose(out[kept], x[kept] / 0.6)
    same, _ = layer.forward(x, None)  # inference: identity
    np.testing.assert_array_equal(same, x)


# ----------------------------------------------------------------------------- loss
def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(700)
    logits = rng.normal(size=(6, 5)) * 3
    labels = rng.integers(0, 5, 6)
    loss, correct, grad = softmax_cross_entropy(logits, labels)
    p = ref_activation(logits, "softmax")
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(6), labels])), rel=1e-12)
    assert correct == int(np.sum(logits.argmax(1) == labels))
    numeric = _numeric_gradient(logits, lambda: softmax_cross_entropy(logits, labels)[0])
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_whole_network_gradient_with_every_layer_type():
    rng = np.random.default_rng(800)
    arch = parse_architecture(
        {
            "input": {"shape": [9, 8, 2]},
            "labels": list("abcde"),
            "layers": [
                {
                    "type": "conv2d",
                    "filters": 5,
                    "kernel_size": [3, 2],
                    "strides": [2, 1],
                    "padding": "same",
                    "activation": "relu",
                },
                {
                    "type": "max_pooling2d",
                    "pool_size": [2, 3],
                    "strides": [1, 2],
                    "padding": "same",
                },
                {
                    "type": "conv2d",
                    "filters": 6,
                    "kernel_size": [3, 3],
                    "padding": "same",
                    "activation": "tanh",
                },
                {
                    "type": "average_pooling2d",
                    "pool_size": [2, 2],
                    "strides": [1, 1],
                    "padding": "same",
                },
                {"type": "dropout", "rate": 0.25},
                {
                    "type": "conv2d",
                    "filters": 7,
                    "kernel_size": [2, 2],
                    "strides": [2, 2],
                    "activation": "sigmoid",
                },
                {"type": "flatten"},
                {"type": "dense", "units": 9, "activation": "relu"},
                {"type": "activation", "activation": "softmax"},
                {"type": "dense", "units": 5, "activation": "softmax"},
            ],
        }
    )
    net = Network(arch, np.float64)
    net.initialize(rng)
    x = rng.normal(size=(3, 9, 8, 2))
    labels = rng.integers(0, 5, 3)

    def loss():
        out, _ = net.forward(x, np.random.default_rng(1))
        return softmax_cross_entropy(out, labels)[0]

    out, caches = net.forward(x, np.random.default_rng(1))
    _, _, dlogits = softmax_cross_entropy(out, labels)
    net.backward(dlogits, caches)
    analytic = net.grads.copy()
    numeric = _numeric_gradient(net.params, loss)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- against the inference Model
def test_network_output_matches_inference_model():
    from convserve.core.presets import preset

    doc = preset("lenet5")
    net = Network(parse_architecture(doc))
    net.initialize(np.random.default_rng(3))
    net.params += (
        np.random.default_rng(4).normal(0, 0.01, net.size).astype(np.float32)
    )  # non-zero biases
    model = Model(doc, net.to_weights())
    images = np.random.default_rng(5).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    ours = net.output(net.preprocess(images))
    np.testing.assert_allclose(ours, model.predict(images), rtol=1e-4, atol=1e-6)
    back = Network(parse_architecture(doc))
    back.load_weights(net.to_weights())
    np.testing.assert_array_equal(back.params, net.params)


# ----------------------------------------------------------------------------- optimizers, schedules
def test_adam_matches_the_update_rule():
    rng = np.random.default_rng(900)
    p = rng.normal(size=1000).astype(np.float32)
    ref = p.astype(np.float64)
    m = np.zeros(1000)
    v = np.zeros(1000)
    opt = Adam(1000, weight_decay=0.01)
    for t in range(1, 6):
        g = rng.normal(size=1000).astype(np.float32)
        opt.step(p, g, 1e-2)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g.astype(np.float64) ** 2
        ref = (
            ref
            - 1e-2 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-7)
            - 1e-2 * 0.01 * ref
        )
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)
    assert opt.t == 5


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_the_update_rule(nesterov):
    rng = np.random.default_rng(901)
    p = rng.normal(size=5000).astype(np.float32)
    ref = p.astype(np.float64)
    vel = np.zeros(5000)
    opt = SGD(5000, momentum=0.9, nesterov=nesterov, weight_decay=1e-3)
    for _ in range(4):
        g = rng.normal(size=5000).astype(np.float32)
        opt.step(p, g, 0.1)
        gd = g + 1e-3 * ref
        vel = 0.9 * vel + gd
        ref = ref - 0.1 * (gd + 0.9 * vel if nesterov else vel)
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)


def test_schedules():
    cos = Schedule("cosine", 0.1, steps_per_epoch=10, epochs=5)
    assert cos(0) == pytest.approx(0.1)
    assert cos(25) == pytest.approx(0.05)
    assert cos(50) == pytest.approx(0.0, abs=1e-12)
    step = Schedule("step", 0.1, steps_per_epoch=10, epochs=20, step_epochs=3, gamma=0.5)
    assert [step(e * 10) for e in (0, 2, 3, 5, 6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    warm = Schedule("constant", 0.1, steps_per_epoch=10, epochs=1, warmup_steps=4)
    assert [warm(s) for s in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="schedule"):
        Schedule("linear", 0.1, 10, 1)


def test_initialisation_scales():
    from convserve.core.presets import preset

    net = Network(parse_architecture(preset("fashion_mnist")))
    net.initialize(np.random.default_rng(0))
    conv2 = net.layers[2].params["kernel"]
    assert conv2.std() == pytest.approx(math.sqrt(2 / 576), rel=0.05)  # He normal: ReLU
    last = net.layers[6].params["kernel"]
    limit = math.sqrt(6 / (128 + 10))  # Glorot uniform: softmax layer
    assert np.abs(last).max() <= limit and np.abs(last).max() > 0.9 * limit
    assert not net.layers[0].params["bias"].any()
    assert same_padding(5, 3, 2) == (1, 1)

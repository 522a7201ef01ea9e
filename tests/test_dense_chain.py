"""Consecutive dense layers in one kernel call (`kernels.dense.dense_chain`): the same bits as
the layers one by one, on random shapes, variants, batch sizes and thread counts, and no part
waits forever when the parts run one after another."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from convserve.core import inference
from convserve.core.architecture import parse_architecture
from convserve.core.inference import InferencePlan
from convserve.core.kernels import dense as kdense
from convserve.core.layers.dense import DenseChainStep, DenseStep
from convserve.core.layers.fusion import blocks
from convserve.core.steps import Program

from tests import reference_numpy as ref

ACTIVATIONS = ["linear", "relu", "tanh", "sigmoid"]


def _document(rng: np.random.Generator) -> dict:
    """A flat input then 2-4 dense layers of random widths (1-16 units: the layer's own
    kernel; more: blocks of 64 or strips of 16) and activations, softmax last or not."""
    inputs = int(rng.integers(3, 700))
    layers: list[dict] = [{"type": "flatten"}]
    for _ in range(int(rng.integers(2, 5))):
        units = int(rng.choice([int(rng.integers(1, 17)), int(rng.integers(17, 400))]))
        layers.append({"type": "dense", "units": units, "activation": rng.choice(ACTIVATIONS)})
    if rng.random() < 0.5:
        layers[-1]["activation"] = "softmax"
    return {
        "name": "chain",
        "input": {"shape": [inputs, 1, 1], "scale": 1.0, "mean": [0.0], "std": [1.0]},
        "labels": [str(i) for i in range(layers[-1]["units"])],
        "layers": layers,
    }


def _dense_model(rng: np.random.Generator, *layers: tuple[int, str]) -> dict:
    """`_document`'s input, then dense layers of (units, activation)."""
    doc = _document(rng)
    dense = [{"type": "dense", "units": u, "activation": a} for u, a in layers]
    doc["layers"] = [{"type": "flatten"}, *dense]
    doc["labels"] = [str(i) for i in range(layers[-1][0])]
    return doc


def _weights(doc: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in parse_architecture(doc).weight_shapes().items():
        scale = np.sqrt(2.0 / shape[0]) if name.endswith(".kernel") else 0.3
        out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return out


def _separate(arch, weights, plan) -> InferencePlan:
    """The same model with its dense layers as separate steps, one kernel call each."""
    chain = inference.chain_dense_steps
    inference.chain_dense_steps = lambda steps: steps
    try:
        return InferencePlan(arch, weights, plan)
    finally:
        inference.chain_dense_steps = chain


@pytest.mark.parametrize("seed", range(8))
def test_chain_gives_the_bits_of_the_layers_one_by_one(seed):
    """Every variant choice, batch sizes from one row to several groups of rows (the layers'
    tasks serial, by units, by rows), on two threads and on one: the chained plan's results
    are bit-identical to the separate layers', and match the float64 reference."""
    rng = np.random.default_rng(seed)
    doc = _document(rng)
    weights = _weights(doc, rng)
    arch = parse_architecture(doc)
    choice = {
        b.layer.index: str(rng.choice(b.layer.inference_variants(b)))
        for b in blocks(arch.layers, inference=True)
        if b.layer.inference_variants(b)
    }
    chained = InferencePlan(arch, weights, choice)
    separate = _separate(arch, weights, choice)
    assert any(isinstance(step, DenseChainStep) for step in chained.steps)
    assert not any(isinstance(step, DenseChainStep) for step in separate.steps)
    x = rng.standard_normal((300, *arch.input_shape)).astype(np.float32)
    threads = numba.get_num_threads()
    try:
        for count in sorted({1, threads}):
            numba.set_num_threads(count)
            for n in (1, 2, 7, 8, 9, 37, 64, 300):
                where = f"{choice}, batch {n}, {count} threads"
                got = chained.run(x[:n])
                np.testing.assert_array_equal(got, separate.run(x[:n]), err_msg=where)
                expected = ref.forward(doc, weights, x[:n])
                np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=where)
    finally:
        numba.set_num_threads(threads)


def test_parts_run_one_after_another_in_any_order():
    """Where a parallel region's parts do not run side by side (fewer threads than parts, a
    scheduler that runs them in any order), the part that runs first claims every task left,
    so no part waits on work no thread will do: each order of three parts on the calling
    thread gives the chain's bits."""
    rng = np.random.default_rng(5)
    doc = _dense_model(rng, (200, "relu"), (90, "tanh"), (10, "softmax"))
    weights = _weights(doc, rng)
    arch = parse_architecture(doc)
    plan = InferencePlan(arch, weights)
    chain = next(step for step in plan.steps if isinstance(step, DenseChainStep))
    n = 40
    x = rng.standard_normal((n, *arch.input_shape)).astype(np.float32)
    expected = plan.run(x)
    program = Program(
        n,
        3,
        plan._tiles,
        (None, None),
        (None, None),
        plan._turn,
        plan._scan_wanted,
        plan._scan_flags,
    )
    chain.emit(program, x.reshape(n, -1), np.empty((n, 10), np.float32))
    ((_, args, _, _),) = program.calls
    x2, wk, bias, acts, _, table, tiles, counters, _, turn = args
    tasks = table[:, kdense.CHAIN_COLUMNS.index("tasks")]
    assert tasks.max() > 1  # parts have tasks of their own to begin with
    for order in ((0, 1, 2), (2, 1, 0), (1, 2, 0)):
        out = np.empty((n, 10), np.float32)
        counters[:] = 0
        for part in order:
            kdense._chain_part(part, 3, x2, wk, bias, acts, out, table, tiles, counters, 0)
        np.testing.assert_array_equal(out, expected, err_msg=str(order))


def test_a_single_dense_layer_stays_a_step_of_its_own():
    """Only runs of two or more dense layers are chained."""
    rng = np.random.default_rng(9)
    doc = _dense_model(rng, (5, "relu"))
    plan = InferencePlan(parse_architecture(doc), _weights(doc, rng))
    kinds = [type(step) for step in plan.steps]
    assert DenseStep in kinds and DenseChainStep not in kinds


def test_warm_up_compiles_what_small_batches_on_one_thread_run():
    """A server runs small batches on one thread (`threads.threads_by_batch`), where a chain
    runs its layers' own serial kernels: after `warmup`, batches of 1-15 images on one thread
    need no kernel compiled for them (a Docker image's build would otherwise miss them)."""
    import importlib
    import pkgutil

    import convserve.core.kernels as kernels_package
    from convserve.core import Model

    modules = [
        importlib.import_module(f"{kernels_package.__name__}.{info.name}")
        for info in pkgutil.iter_modules(kernels_package.__path__)
    ]
    dispatchers = [
        value
        for module in modules
        for value in vars(module).values()
        if hasattr(value, "signatures") and hasattr(value, "py_func")
    ]
    rng = np.random.default_rng(3)
    doc = _dense_model(rng, (300, "relu"), (10, "softmax"))
    model = Model(doc, _weights(doc, rng), plan=False)
    model.warmup((1, 64))
    model.forward(np.zeros((1, *model.input_shape), np.float32))  # (the input's NaN scan)
    before = {id(d): len(d.signatures) for d in dispatchers}
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        for n in range(1, 16):
            model.forward(rng.standard_normal((n, *model.input_shape)).astype(np.float32))
    finally:
        numba.set_num_threads(threads)
    grown = [d.py_func.__name__ for d in dispatchers if len(d.signatures) != before[id(d)]]
    assert not grown

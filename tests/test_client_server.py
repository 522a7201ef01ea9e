"""Client and AsyncClient against real convserve servers on loopback."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from convserve.client import AsyncClient, Client, InferenceError, Prediction, RetryPolicy
from convserve.core.presets import FASHION_MNIST_LABELS

from tests.client_servers import (
    TRAINED,
    ServerProcess,
    decoded_examples,
    example_files,
    free_port,
    statistics,
    write_repository,
)

MAX_BATCH = 8  # small, so that inputs of a few dozen images need chunks


@pytest.fixture(scope="module")
def repositories(tmp_path_factory):
    one = write_repository(tmp_path_factory.mktemp("one-model"), {"fashion_mnist": "fashion_mnist"})
    two = write_repository(
        tmp_path_factory.mktemp("two-models"),
        {"fashion_mnist": "fashion_mnist", "lenet5": "lenet5"},
    )
    return one, two


@pytest.fixture(scope="module")
def servers(repositories, tmp_path_factory):
    """Server A (one model) and B (two models), both refusing requests of more than MAX_BATCH images."""
    one, two = repositories
    logs = tmp_path_factory.mktemp("logs")
    flags = ("--max-batch-size", str(MAX_BATCH), "--max-request-images", str(MAX_BATCH))
    started = []
    try:
        # One after the other: the second finds the kernels the first compiled in Numba's cache.
        for repository in (one, two):
            started.append(ServerProcess(repository, logs, *flags))
            started[-1].wait_ready()
        yield started
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def reference(repositories):
    """The served fashion_mnist model, run locally by the core: what the server must answer."""
    from convserve.core import Model

    return Model.load(repositories[0] / "fashion_mnist" / "1" / "model.safetensors")


def test_health_metadata_and_labels(server):
    with Client(server.target, timeout=10) as client:
        assert client.is_live() and client.is_ready() and client.is_ready("fashion_mnist")
        assert client.models() == ["fashion_mnist"]
        info = client.metadata()  # the one model, found without naming it
        assert info.name == "fashion_mnist" and info.versions == ("1",)
        assert info.input_shape == (28, 28, 1) and info.input.datatype == "UINT8"
        assert info.num_classes == 10 and info.max_batch_size == MAX_BATCH
        assert client.labels() == tuple(FASHION_MNIST_LABELS)
        with pytest.raises(InferenceError) as error:
            client.is_ready("no_such_model")
        assert (
            error.value.code == grpc.StatusCode.INVALID_ARGUMENT
            and "no_such_model" in error.value.message
        )


def test_predict_matches_the_core_for_paths_bytes_and_arrays(server, reference):
    files = [path for path, _, _ in example_files()]
    expected = reference.predict(decoded_examples())
    with Client(server.target) as client:
        from_paths = client.predict([str(p) for p in files])
        from_bytes = client.predict([p.read_bytes() for p in files])
        from_array = client.predict(decoded_examples())
    assert from_paths.shape == (len(files), 10) and from_paths.dtype == np.float32
    np.testing.assert_allclose(from_paths, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(from_bytes, from_paths)
    np.testing.assert_array_equal(from_array, from_paths)
    np.testing.assert_allclose(from_paths.sum(axis=1), 1.0, rtol=1e-5)


def test_classify_agrees_with_predict(server):
    files = [str(path) for path, _, _ in example_files()]
    with Client(server.target) as client:
        probabilities = client.predict(files)
        rows = client.classify(files, top_k=3)
        everything = client.classify(files[0], top_k=50)  # more than the classes: all of them
    assert len(rows) == len(files) and all(len(r) == 3 for r in rows)
    for row, probs in zip(rows, probabilities):
        assert all(isinstance(p, Prediction) for p in row)
        assert [p.index for p in row] == list(np.argsort(-probs, kind="stable")[:3])
        assert [p.label for p in row] == [FASHION_MNIST_LABELS[p.index] for p in row]
        np.testing.assert_allclose([p.score for p in row], probs[[p.index for p in row]], atol=1e-6)
        assert row[0].score >= row[1].score >= row[2].score
    assert sorted(p.index for p in everything[0]) == list(range(10))


@pytest.mark.skipif(not TRAINED.is_file(), reason="no trained model in models/fashion_mnist/1 yet")
def test_trained_model_recognises_the_examples(server):
    with Client(server.target) as client:
        rows = client.classify([str(p) for p, _, _ in example_files()], top_k=1)
    correct = sum(row[0].index == index for row, (_, index, _) in zip(rows, example_files()))
    assert correct >= len(rows) - 1, [
        (p.name, row[0]) for row, (p, _, _) in zip(rows, example_files())
    ]


def test_large_inputs_go_in_chunks_in_order(server, reference):
    images = np.random.default_rng(1).integers(
        0, 256, (203, 28, 28), dtype=np.uint8
    )  # (N, H, W) batch
    expected = reference.predict(images[:, :, :, None])
    images_before, requests_before = statistics(server.target, "fashion_mnist")
    with Client(server.target, concurrency=4) as client:
        got = client.predict(images)
    images_after, requests_after = statistics(server.target, "fashion_mnist")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert images_after - images_before == 203
    assert (
        requests_after - requests_before == 26
    )  # ceil(203 / 8): the server refuses more than 8 per request


def test_one_client_shared_by_threads(server, reference):
    from concurrent.futures import ThreadPoolExecutor

    batches = [
        np.random.default_rng(10 + i).integers(0, 256, (30, 28, 28, 1), dtype=np.uint8)
        for i in range(6)
    ]
    with Client(server.target, concurrency=3) as client, ThreadPoolExecutor(6) as threads:
        results = list(threads.map(client.predict, batches))
    for batch, got in zip(batches, results):
        np.testing.assert_allclose(got, reference.predict(batch), rtol=1e-5, atol=1e-6)


def test_errors_carry_the_code_and_the_servers_message(server):
    with Client(server.target) as client:
        with pytest.raises(InferenceError) as error:
            client.predict(decoded_examples()[:1], model="no_such_model")
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown model" in error.value.message and "no_such_model" in error.value.message
        with pytest.raises(InferenceError) as error:
            client.predict(decoded_examples()[:1], version="9")
        assert error.value.code == grpc.StatusCode.NOT_FOUND and "version 9" in error.value.message
        with pytest.raises(InferenceError) as error:
            client.predict(np.zeros((300, 28, 28, 1), np.uint8), timeout=0.001)
        assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(ValueError, match="top_k"):
            client.classify(decoded_examples()[:1], top_k=0)
        # The client is still usable after failures.
        assert client.predict(decoded_examples()[:2]).shape == (2, 10)


def test_several_models_need_a_name(servers):
    two = servers[1]
    with Client(two.target) as client:
        assert client.models() == ["fashion_mnist", "lenet5"]
        with pytest.raises(
            InferenceError, match=r"2 ready models \['fashion_mnist', 'lenet5'\]; pass model=NAME"
        ):
            client.predict(decoded_examples()[:1])
        assert client.predict(decoded_examples()[:1], model="lenet5").shape == (1, 10)


def test_round_robin_spreads_requests_over_two_targets(servers):
    targets = [s.target for s in servers]
    before = [statistics(t, "fashion_mnist")[1] for t in targets]
    with Client(targets) as client:
        assert client.round_robin and client.target.startswith("ipv4:")
        for _ in range(20):
            client.predict(decoded_examples()[:1], model="fashion_mnist")
    sent = [statistics(t, "fashion_mnist")[1] - b for t, b in zip(targets, before)]
    assert sum(sent) == 20
    assert min(sent) >= 5, f"requests per server: {sent}"  # round_robin, not pick_first (20 + 0)
    # Control: one target string gets gRPC's default pick_first.
    assert not Client(targets[0]).round_robin
    # A dns:/// name uses round_robin over whatever the name resolves to.
    with Client(f"dns:///localhost:{servers[0].port}") as client:
        assert client.round_robin
        assert client.predict(decoded_examples()[:2], model="fashion_mnist").shape == (2, 10)


def test_unavailable_is_retried_until_the_server_is_up(repositories, tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    images = decoded_examples()[:3]
    # Without retries, a server that is not up fails at once with UNAVAILABLE.
    with Client(target, retries=0, timeout=5) as client:
        with pytest.raises(InferenceError) as error:
            client.predict(images)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE and error.value.attempts == 1

    result: dict = {}

    def call() -> None:
        policy = RetryPolicy(attempts=10_000, initial_backoff=0.05, max_backoff=0.5)
        with Client(target, retries=policy, timeout=180) as client:
            try:
                result["probabilities"] = client.predict(images)
            except Exception as exc:  # reported below
                result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()  # the call starts while nothing listens on the port ...
    server = ServerProcess(repositories[0], tmp_path, port=port)  # ... then the server comes up
    try:
        caller.join(timeout=200)
        assert not caller.is_alive()
        assert "error" not in result, f"{result.get('error')}\n{server.log()}"
        assert result["probabilities"].shape == (3, 10)
    finally:
        server.stop()


def test_async_client(servers, reference):
    server = servers[0]
    files = [str(path) for path, _, _ in example_files()]
    images = np.random.default_rng(2).integers(0, 256, (45, 28, 28, 1), dtype=np.uint8)

    async def scenario():
        async with AsyncClient(server.target, concurrency=3) as client:
            live, ready = await client.is_live(), await client.is_ready("fashion_mnist")
            models = await client.models()
            info = await client.metadata()
            labels = await client.labels()
            probs = await client.predict(files)
            rows = await client.classify(files, top_k=2)
            chunked = await client.predict(images)
            concurrent = await asyncio.gather(
                *(client.predict(images[i : i + 5]) for i in range(0, 45, 5))
            )
            with pytest.raises(InferenceError) as error:
                await client.predict(images[:1], model="no_such_model")
            return live, ready, models, info, labels, probs, rows, chunked, concurrent, error.value

    live, ready, models, info, labels, probs, rows, chunked, concurrent, error = asyncio.run(
        scenario()
    )
    assert live and ready and models == ["fashion_mnist"] and info.max_batch_size == MAX_BATCH
    assert labels == tuple(FASHION_MNIST_LABELS)
    with Client(server.target) as client:
        np.testing.assert_array_equal(probs, client.predict(files))
    assert [r[0].index for r in rows] == list(probs.argmax(axis=1))
    np.testing.assert_allclose(chunked, reference.predict(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate(concurrent), chunked)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT

    async def unreachable():
        async with AsyncClient(f"127.0.0.1:{free_port()}", retries=1, timeout=5) as client:
            assert await client.is_live() is False
            with pytest.raises(InferenceError) as error:
                await client.models()
            return error.value

    error = asyncio.run(unreachable())
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.attempts == 2

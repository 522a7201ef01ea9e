"""Client pieces that need no server: retry policy, deadlines, targets, wire parsing, tables."""

from __future__ import annotations

import asyncio
import inspect
import random
import socket

import grpc
import numpy as np
import pytest
from convserve.client import AsyncClient, Client, InferenceError, RetryPolicy, channel, protocol
from convserve.client.cli import format_table
from convserve.client.plan import Running, Sleep
from convserve.client.retry import Deadline, call
from convserve.proto import grpc_service_pb2 as pb


class _Status(grpc.RpcError):
    """An RpcError with a code, as grpc raises them (for the policy's bookkeeping only)."""

    def __init__(self, code: grpc.StatusCode, details: str = "down"):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_backoff_is_capped_exponential_with_full_jitter():
    policy = RetryPolicy(attempts=10, initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    rng = random.Random(0)
    for attempt, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [policy.backoff(attempt, rng) for _ in range(300)]
        assert 0 <= min(delays) and max(delays) <= cap
        assert max(delays) > 0.9 * cap and min(delays) < 0.1 * cap  # spread over [0, cap]: jitter


def test_retry_policy_of():
    assert RetryPolicy.of(0).attempts == 1
    assert RetryPolicy.of(3).attempts == 4
    assert RetryPolicy.of(None).attempts == 1
    custom = RetryPolicy(attempts=2)
    assert RetryPolicy.of(custom) is custom
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="retries must be"):
            RetryPolicy.of(bad)
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RetryPolicy(attempts=0)


def test_call_retries_only_unavailable_and_counts_attempts():
    sleeps: list[float] = []
    outcomes = [_Status(grpc.StatusCode.UNAVAILABLE), _Status(grpc.StatusCode.UNAVAILABLE), "ok"]
    timeouts: list[float] = []

    def attempt(seconds):
        timeouts.append(seconds)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    policy = RetryPolicy(attempts=5, initial_backoff=0.01, max_backoff=0.05)
    assert call(attempt, policy, Deadline(5.0), "X", sleep=sleeps.append) == "ok"
    assert len(sleeps) == 2 and all(0 <= s <= 0.05 for s in sleeps)
    assert all(0 < t <= 5.0 for t in timeouts) and timeouts == sorted(timeouts, reverse=True)

    with pytest.raises(InferenceError) as info:
        call(
            lambda s: (_ for _ in ()).throw(_Status(grpc.StatusCode.INVALID_ARGUMENT, "bad shape")),
            policy,
            Deadline(5.0),
            "X",
            sleep=sleeps.append,
        )
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.attempts == 1
    assert info.value.message == "bad shape" and "[INVALID_ARGUMENT] bad shape" == str(info.value)

    count = 0

    def always_down(seconds):
        nonlocal count
        count += 1
        raise _Status(grpc.StatusCode.UNAVAILABLE, "connection refused")

    with pytest.raises(InferenceError) as info:
        call(always_down, policy, Deadline(5.0), "X", sleep=lambda s: None)
    assert (
        count == 5 and info.value.attempts == 5 and info.value.code == grpc.StatusCode.UNAVAILABLE
    )
    assert "after 5 attempts" in str(info.value)


def test_no_sleep_runs_past_the_deadline():
    slept: list[float] = []
    policy = RetryPolicy(attempts=100, initial_backoff=10.0, max_backoff=10.0)
    random.seed(1)
    with pytest.raises(InferenceError) as info:
        call(
            lambda s: (_ for _ in ()).throw(_Status(grpc.StatusCode.UNAVAILABLE)),
            policy,
            Deadline(0.05),
            "X",
            sleep=slept.append,
        )
    assert all(s < 0.05 for s in slept)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Deadline(0)


def test_targets(monkeypatch):
    monkeypatch.delenv("CONVSERVE_TARGET", raising=False)
    assert channel.resolve(None) == ("localhost:8001", False)
    monkeypatch.setenv("CONVSERVE_TARGET", "example.org:9000")
    assert channel.resolve(None) == ("example.org:9000", False)
    assert channel.resolve("10.0.0.1:8001") == ("10.0.0.1:8001", False)
    assert channel.resolve("dns:///convserve.svc:8001") == ("dns:///convserve.svc:8001", True)
    assert channel.resolve(["127.0.0.1:1", "127.0.0.2:2"]) == ("ipv4:127.0.0.1:1,127.0.0.2:2", True)
    assert channel.resolve("127.0.0.1:1, 127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", True)
    assert channel.resolve(["[::1]:5", "[::1]:6"]) == ("ipv6:[::1]:5,[::1]:6", True)
    target, rr = channel.resolve(["localhost:7001", "127.0.0.1:7002"])
    assert (
        rr
        and target.startswith("ipv4:")
        and "127.0.0.1:7001" in target
        and target.endswith("127.0.0.1:7002")
    )
    with pytest.raises(ValueError, match="host:port"):
        channel.resolve(["127.0.0.1", "127.0.0.1:2"])
    with pytest.raises(ValueError, match="cannot resolve"):
        channel.resolve(["no-such-host.invalid:1", "127.0.0.1:2"])
    with pytest.raises(ValueError, match="at least one"):
        channel.resolve([])
    options = dict(channel.options(True))
    assert options["grpc.lb_policy_name"] == "round_robin"
    assert options["grpc.max_receive_message_length"] == 2**31 - 1
    assert "grpc.lb_policy_name" not in dict(channel.options(False))


def test_chunks_cover_everything_in_order():
    for n, size in [(1, 8), (8, 8), (9, 8), (1000, 64), (5, 0), (130, 1)]:
        parts = protocol.chunks(n, size)
        covered = [i for p in parts for i in range(p.start, p.stop)]
        assert covered == list(range(n))
        assert all(p.stop - p.start <= size for p in parts) or size <= 0
    assert len(protocol.chunks(1000, 64)) == 16


def _info(datatype="UINT8"):
    meta = pb.ModelMetadataResponse(name="m", versions=["1"], platform="convserve")
    meta.inputs.add(name="input", datatype=datatype, shape=[-1, 28, 28, 1])
    meta.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 10])
    config = pb.ModelConfigResponse()
    config.config.max_batch_size = 32
    return protocol.model_info(meta, config)


def test_model_info_and_request():
    info = _info()
    assert info.input_shape == (28, 28, 1) and info.input_dtype == np.uint8
    assert info.num_classes == 10 and info.max_batch_size == 32
    batch = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28, 1)
    request = protocol.infer_request(info, "1", batch, class_count=3)
    assert request.model_name == "m" and request.model_version == "1"
    assert list(request.inputs[0].shape) == [2, 28, 28, 1] and request.inputs[0].datatype == "UINT8"
    assert request.raw_input_contents[0] == batch.tobytes()
    assert request.outputs[0].name == "probabilities"
    assert request.outputs[0].parameters["classification"].int64_param == 3
    with pytest.raises(InferenceError, match="expected a numeric type"):
        _ = _info("BYTES").input_dtype


def test_parse_outputs():
    probs = np.random.default_rng(0).random((3, 10)).astype(np.float32)
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[3, 10])
    response.raw_output_contents.append(probs.tobytes())
    np.testing.assert_array_equal(protocol.probabilities(response, "probabilities", 3), probs)
    with pytest.raises(InferenceError, match="expected 2 rows"):
        protocol.probabilities(response, "probabilities", 2)
    with pytest.raises(InferenceError, match="lacks output 'other'"):
        protocol.probabilities(response, "other", 3)

    entries = [b"0.900000:3:Dress", b"0.100000:0:T-shirt/top", b"0.600000:7:a:b", b"0.400000:1"]
    raw = b"".join(len(e).to_bytes(4, "little") + e for e in entries)
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="probabilities", datatype="BYTES", shape=[2, 2])
    response.raw_output_contents.append(raw)
    rows = protocol.classifications(response, "probabilities", 2)
    assert rows == [
        [protocol.Prediction("Dress", 3, 0.9), protocol.Prediction("T-shirt/top", 0, 0.1)],
        [protocol.Prediction("a:b", 7, 0.6), protocol.Prediction("1", 1, 0.4)],
    ]
    with pytest.raises(InferenceError, match="malformed classification"):
        protocol.parse_class(b"nonsense")
    response.raw_output_contents[0] = raw[:-3]
    with pytest.raises(InferenceError, match="malformed BYTES"):
        protocol.classifications(response, "probabilities", 2)


def test_format_table():
    text = format_table(
        ["FILE", "LABEL", "SCORE"],
        [["a.png", "Sneaker", "0.9812"], ["long/path.png", "Bag", "0.5"]],
        right=(2,),
    )
    lines = text.splitlines()
    assert lines[0] == "FILE           LABEL     SCORE"
    assert lines[1] == "a.png          Sneaker  0.9812"
    assert lines[2] == "long/path.png  Bag         0.5"


def test_import_is_light_in_a_fresh_interpreter():
    import subprocess
    import sys

    code = (
        "import sys; import convserve.client; from convserve.client import Client, AsyncClient, Prediction, "
        "InferenceError; import convserve.client.cli; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite', 'torch', 'PIL') "
        "or m.startswith('convserve.core') or m.startswith('convserve.server')); print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_unused_port_is_unreachable_quickly():
    # Sanity for the integration tests' assumption: a closed loopback port refuses at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=2.0, retries=0) as client:
        assert client.is_live() is False
        with pytest.raises(InferenceError) as info:
            client.models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


OPERATIONS = (
    "is_live",
    "is_ready",
    "wait_until_ready",
    "models",
    "repository",
    "metadata",
    "labels",
    "predict",
    "classify",
)


def test_each_operation_is_written_once_for_both_clients():
    for name in OPERATIONS:
        blocking, awaiting = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.signature(blocking) == inspect.signature(awaiting), name
        assert blocking.__doc__ and blocking.__doc__ == awaiting.__doc__, name
        # frameworks decide by this whether to await a callback
        assert not inspect.iscoroutinefunction(blocking), name
        assert inspect.iscoroutinefunction(awaiting), name
        assert inspect.iscoroutinefunction(getattr(AsyncClient(), name)), name


def test_a_plan_can_catch_a_failed_effect_and_go_on():
    def plan():
        try:
            yield Sleep(1.0)
        except InferenceError as error:
            caught = error.code
        reply = yield Sleep(2.0)
        return caught, reply

    running = Running(plan())
    assert running.effect == Sleep(1.0) and not running.done
    running.resume(None, InferenceError("down", grpc.StatusCode.UNAVAILABLE))
    assert running.effect == Sleep(2.0) and not running.done
    running.resume("answer")
    assert running.done and running.result == (grpc.StatusCode.UNAVAILABLE, "answer")


def test_both_clients_give_up_waiting_at_the_deadline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    with Client(target, retries=1) as client:
        with pytest.raises(InferenceError) as blocking:
            client.wait_until_ready(timeout=0.5)
        with pytest.raises(InferenceError) as refused:
            client.models(timeout=5)

    async def scenario() -> tuple[InferenceError, InferenceError, bool]:
        async with AsyncClient(target, retries=1) as client:
            task = asyncio.create_task(client.wait_until_ready(timeout=0.5))  # a coroutine
            with pytest.raises(InferenceError) as awaiting:
                await task
            with pytest.raises(InferenceError) as refused:
                await client.models(timeout=5)
            return awaiting.value, refused.value, await client.is_live(timeout=2)

    awaiting, async_refused, live = asyncio.run(scenario())
    for error in (blocking.value, awaiting):
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "to be ready" in error.message and error.attempts > 1
    for error in (refused.value, async_refused):
        assert error.code == grpc.StatusCode.UNAVAILABLE and error.attempts == 2
    assert live is False

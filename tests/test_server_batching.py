"""Dynamic batching through a real server: invariance, queue limits, deadlines, timeouts, cancellation."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from convserve.proto import grpc_service_pb2 as pb

from tests import server_harness as h


def _stats(api, model: str, version: str) -> pb.ModelStatistics:
    return api.ModelStatistics(
        pb.ModelStatisticsRequest(name=model, version=version), timeout=10
    ).model_stats[0]


def test_responses_are_identical_alone_and_batched():
    """64 concurrent single-image requests batch together; each answer equals the one computed alone."""
    server = h.main_server()
    api, channel = h.stub(server.target)
    try:
        x = h.images(64, seed=21)
        alone = []
        for i in range(64):
            response = api.ModelInfer(h.infer_request("fashion", x[i : i + 1]))
            assert h.parameters(response)["batch_size"] == 1
            alone.append(response.raw_output_contents[0])
        batched_seen = 0
        for _ in range(10):  # until batches actually formed
            futures = [
                api.ModelInfer.future(h.infer_request("fashion", x[i : i + 1])) for i in range(64)
            ]
            responses = [f.result(timeout=60) for f in futures]
            for i, response in enumerate(responses):
                assert response.raw_output_contents[0] == alone[i], (
                    f"image {i} differs when batched"
                )
            batched_seen += sum(h.parameters(r)["batch_size"] > 1 for r in responses)
            if batched_seen >= 16:
                break
        assert batched_seen >= 16, "requests rarely shared a batch"
        # multi-image requests sharing a batch
        futures = [
            api.ModelInfer.future(h.infer_request("fashion", x[8 * i : 8 * i + 8]))
            for i in range(8)
        ]
        for i, f in enumerate(futures):
            got = f.result(timeout=60).raw_output_contents[0]
            assert got == b"".join(alone[8 * i : 8 * i + 8])
    finally:
        channel.close()


def test_full_queue_is_refused_at_once_with_numbers():
    server = h.slow_server()  # --max-batch-size 1 --max-queue-size 4
    api, channel = h.stub(server.target)

    def rejected_total() -> float:
        return h.metric(
            server.metrics(),
            "convserve_requests_total",
            model="fashion",
            version="2",
            outcome="rejected",
        )

    try:
        x = h.images(64, seed=22)
        before = rejected_total()
        futures = [api.ModelInfer.future(h.infer_request("fashion", x)) for _ in range(16)]
        ok, rejected = 0, []
        for f in futures:
            try:
                assert h.probabilities(f.result(timeout=120)).shape == (64, 10)
                ok += 1
            except grpc.RpcError as exc:
                rejected.append(exc)
        assert ok >= 1 and len(rejected) >= 5
        for exc in rejected:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            pushback = dict(exc.trailing_metadata() or ())
            assert int(pushback["grpc-retry-pushback-ms"]) >= 1
            assert exc.details().startswith("Exceeds maximum queue size:")
            assert "for model 'fashion', the maximum is 4" in exc.details()
        after = rejected_total()
        assert after - before == len(rejected)
    finally:
        channel.close()


def test_expired_timed_out_and_cancelled_requests_are_never_computed():
    """Behind a long request: a passed gRPC deadline, an expired `timeout` parameter and a cancelled
    call all leave the queue; the model computes only the long request's images."""
    server = h.slow_server()
    api, channel = h.stub(server.target)
    try:
        text = server.metrics()
        timeouts0 = h.metric(
            text, "convserve_requests_total", model="fashion", version="2", outcome="timeout"
        )
        cancelled0 = h.metric(
            text, "convserve_requests_total", model="fashion", version="2", outcome="cancelled"
        )
        images0 = _stats(api, "fashion", "2").inference_count
        long = api.ModelInfer.future(h.infer_request("fashion", h.images(8000, seed=23)))
        time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as deadline:
            api.ModelInfer(h.infer_request("fashion", h.images(3, seed=24)), timeout=0.05)
        assert deadline.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(grpc.RpcError) as timeout:
            api.ModelInfer(
                h.infer_request("fashion", h.images(5, seed=25), parameters={"timeout": 1000}),
                timeout=60,
            )
        assert timeout.value.code() == grpc.StatusCode.UNAVAILABLE
        assert timeout.value.details().startswith("Request timeout expired")
        assert "'timeout' parameter" in timeout.value.details()
        call = api.ModelInfer.future(h.infer_request("fashion", h.images(7, seed=26)))
        time.sleep(0.05)
        assert call.cancel()
        assert h.probabilities(long.result(timeout=120)).shape == (8000, 10)
        time.sleep(0.2)
        assert _stats(api, "fashion", "2").inference_count - images0 == 8000
        text = server.metrics()
        assert (
            h.metric(
                text, "convserve_requests_total", model="fashion", version="2", outcome="timeout"
            )
            - timeouts0
            == 2
        )
        assert (
            h.metric(
                text, "convserve_requests_total", model="fashion", version="2", outcome="cancelled"
            )
            - cancelled0
            == 1
        )
    finally:
        channel.close()


def test_max_batch_size_one_still_serves_concurrent_clients_correctly():
    server = h.slow_server()
    api, channel = h.stub(server.target)
    try:
        x = h.images(4, seed=27)
        expected = h.local_model("fashion", 2).predict(x)
        with ThreadPoolExecutor(4) as pool:
            responses = list(
                pool.map(
                    lambda i: api.ModelInfer(h.infer_request("fashion", x[i : i + 1]), timeout=60),
                    range(4),
                )
            )
        for i, response in enumerate(responses):
            assert h.parameters(response)["batch_size"] == 1
            np.testing.assert_allclose(
                h.probabilities(response)[0], expected[i], rtol=1e-5, atol=1e-7
            )
    finally:
        channel.close()

"""Locust load test: real Fashion-MNIST images sent as ModelInfer calls over gRPC.

Works against convserve or any Open Inference Protocol (KServe V2 / Triton) server. Each
simulated user holds its own gRPC channel and sends requests back to back (closed loop), each
one a slice of consecutive test images; every answer is checked (shape, datatype, framing) and
its top-1 classes are compared with the true labels. Headless run (see README, "Load testing"):

    locust -f loadtest/locustfile.py --headless -u 16 -r 16 -t 20s \
        --host 127.0.0.1:8001 --csv out/loadtest --p99-ms 250

The run fails (exit code 1) when the failure ratio exceeds --max-fail-ratio (default 0: any
failed request fails the run), when p99 exceeds --p99-ms, when top-1 accuracy is below
--min-accuracy, or when no request completed.
"""

from __future__ import annotations

# gRPC's C core must cooperate with gevent before any channel exists, or every call blocks
# the whole event loop and locust's users run one at a time.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import itertools  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import grpc  # noqa: E402
from convserve.proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402
from mnist_requests import DEFAULT_DATASET, build_requests, load_images, top1  # noqa: E402

log = logging.getLogger("convserve.loadtest")
INT32_MAX = 2**31 - 1

_requests: list = []  # PreparedRequest pool shared by the users of this process
_answers = {"images": 0, "correct": 0}  # top-1 answers checked by this process
_user_numbers = itertools.count()


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("convserve", "ModelInfer requests and pass/fail thresholds")
    group.add_argument(
        "--model-name", default="fashion_mnist", help="model to call (default: fashion_mnist)"
    )
    group.add_argument(
        "--model-version", default="", help="model version; empty = the server's latest (default)"
    )
    group.add_argument(
        "--images-per-request",
        type=int,
        default=1,
        help="Fashion-MNIST images in each request (default: 1)",
    )
    group.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="ask for the top-k classes (classification extension) instead of probabilities; "
        "0 = probabilities (default)",
    )
    group.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"directory of the Fashion-MNIST IDX files (default: {DEFAULT_DATASET})",
    )
    group.add_argument(
        "--deadline-s", type=float, default=10.0, help="gRPC deadline of each call (default: 10)"
    )
    group.add_argument(
        "--p99-ms",
        type=float,
        default=250.0,
        help="fail the run if the 99th percentile response time exceeds this (ms; default 250; "
        "0 disables the check)",
    )
    group.add_argument(
        "--max-fail-ratio",
        type=float,
        default=0.0,
        help="fail the run if more than this fraction of requests failed (default 0: any failure)",
    )
    group.add_argument(
        "--min-accuracy",
        type=float,
        default=0.0,
        help="fail the run if top-1 accuracy over the answered images is below this "
        "(0..1; default 0 = no check)",
    )


@events.test_start.add_listener
def _prepare(environment, **_kwargs) -> None:
    if _requests:
        return
    o = environment.parsed_options
    images, labels = load_images(o.dataset)
    _requests.extend(
        build_requests(
            images,
            labels,
            per_request=o.images_per_request,
            model=o.model_name,
            version=o.model_version,
            top_k=o.top_k,
        )
    )
    log.info(
        "prepared %d requests of %d Fashion-MNIST test image(s) each for model '%s'%s",
        len(_requests),
        o.images_per_request,
        o.model_name,
        f", top-{o.top_k} classes" if o.top_k else "",
    )


def grpc_target(host: str | None) -> str:
    """`--host` as a gRPC target: `127.0.0.1:8001`; a `grpc://` or `http://` prefix is dropped."""
    if not host:
        return "127.0.0.1:8001"
    for scheme in ("grpc://", "http://"):
        if host.startswith(scheme):
            host = host[len(scheme) :]
    return host.rstrip("/")


class InferenceUser(User):
    """One client: its own channel, ModelInfer calls back to back, every answer checked."""

    host = "127.0.0.1:8001"
    wait_time = constant(0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self._options = o
        self._channel = grpc.insecure_channel(
            grpc_target(self.host),
            options=[
                ("grpc.max_send_message_length", INT32_MAX),
                ("grpc.max_receive_message_length", INT32_MAX),
            ],
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        # Users start at different offsets so they do not all send the same images.
        start = (next(_user_numbers) * 97) % max(len(_requests), 1)
        self._next = itertools.islice(itertools.cycle(_requests), start, None)
        self._name = f"ModelInfer x{o.images_per_request}" + (f" top{o.top_k}" if o.top_k else "")

    def on_stop(self) -> None:
        self._channel.close()

    @task
    def infer(self) -> None:
        prepared = next(self._next)
        o = self._options
        start = time.perf_counter()
        response, exception, length = None, None, 0
        try:
            response = self._stub.ModelInfer(prepared.message, timeout=o.deadline_s)
            length = response.ByteSize()
            predicted = top1(response, len(prepared.labels), top_k=o.top_k)
            _answers["images"] += len(predicted)
            _answers["correct"] += int((predicted == prepared.labels).sum())
        except grpc.RpcError as exc:
            exception = RuntimeError(f"{exc.code().name}: {exc.details()}")
        except ValueError as exc:  # a malformed answer
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=self._name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            response=response,
            context={},
            exception=exception,
        )


@events.quitting.add_listener
def _check_thresholds(environment, **_kwargs) -> None:
    """Decide the exit code: failures, p99 and accuracy against the documented bounds."""
    if isinstance(environment.runner, WorkerRunner):
        return
    o = environment.parsed_options
    total = environment.stats.total
    problems = []
    if total.num_requests == 0:
        problems.append("no request completed")
    if total.fail_ratio > o.max_fail_ratio:
        problems.append(
            f"{total.num_failures} of {total.num_requests} requests failed "
            f"(ratio {total.fail_ratio:.4f} > {o.max_fail_ratio})"
        )
    p50 = total.get_response_time_percentile(0.50) or 0
    p99 = total.get_response_time_percentile(0.99) or 0
    if o.p99_ms > 0 and p99 > o.p99_ms:
        problems.append(f"p99 {p99:.0f} ms > bound {o.p99_ms:g} ms")
    # Accuracy is counted where the answers arrive: known only in a single-process run.
    local = not isinstance(environment.runner, MasterRunner)
    accuracy = _answers["correct"] / _answers["images"] if _answers["images"] else 0.0
    if local and o.min_accuracy > 0 and accuracy < o.min_accuracy:
        problems.append(f"top-1 accuracy {accuracy:.4f} < {o.min_accuracy}")
    checked = (
        f"top-1 accuracy {accuracy:.4f} over {_answers['images']} images"
        if local
        else "accuracy n/a (--processes)"
    )
    rps = total.total_rps
    summary = (
        f"convserve loadtest: {total.num_requests} requests, {total.num_failures} failed, "
        f"{rps:.1f} req/s ({rps * o.images_per_request:.1f} img/s), p50 {p50:.0f} ms, "
        f"p99 {p99:.0f} ms (bound {o.p99_ms:g} ms), {checked}"
    )
    if problems:
        environment.process_exit_code = 1
        log.error("%s -> FAIL: %s", summary, "; ".join(problems))
    else:
        environment.process_exit_code = 0
        log.info("%s -> PASS", summary)

"""Build and run the Ray Serve application: `build_app` for Serve, `run` for `convserve ray-serve`.

(Not named `app`: a submodule of that name would hide the package's lazy `app` attribute, the
`convserve.ray:app` import path.)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

from convserve.ray.settings import RaySettings, resolve
from convserve.server.config import resolve_repository

log = logging.getLogger("convserve.ray")

APP_NAME = "convserve"
INGRESS_NAME = "convserve"
# Ray's gRPC proxy serves the services whose `add_*Servicer_to_server` functions it is given
GRPC_SERVICERS = (
    "convserve.proto.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
MESSAGE_SIZE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"  # read by Ray's proxy when it starts
GRACEFUL_SHUTDOWN_S = 30.0
INGRESS_MAX_ONGOING = 4096  # the ingress only awaits model calls: never the bottleneck
# Serve's per-request access log line costs each replica more than a small batch's compute
LOGGING = {"enable_access_log": False}


def deployment_name(model: str) -> str:
    return f"model_{model}"


def model_deployment_options(settings: RaySettings) -> dict[str, Any]:
    """Replica count or autoscaling, CPUs and Numba threads of each model's deployment."""
    cfg = settings.server
    # The batcher queues and refuses (QueueFull) as `convserve serve` does: Ray hands a replica
    # its whole queue plus the batch computing, instead of queueing in front of it.
    queue = cfg.max_queue_size or 100_000
    # one thread pool per replica, sized to its CPUs: Numba's, and any OpenMP/BLAS pool too
    threads = str(settings.numba_threads)
    env = {
        "NUMBA_NUM_THREADS": threads,
        "OMP_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "GOMP_SPINCOUNT": "1000",
    }
    if os.environ.get("NUMBA_CACHE_DIR"):  # replicas reuse the compiled kernels
        env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    return dict(
        settings.scaling(),
        max_ongoing_requests=queue + cfg.max_batch_size,
        ray_actor_options={"num_cpus": settings.replica_cpus, "runtime_env": {"env_vars": env}},
        # a hung replica is noticed within seconds (Serve's default checks every 10 s)
        health_check_period_s=2.0,
        # a replica being replaced or removed answers the calls it holds before it stops; Serve
        # kills it after this even if it still holds some (a loaded replica needs seconds)
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        logging_config=LOGGING,
    )


def build(settings: RaySettings, model_server: type | None = None):
    """The application: one deployment per model of the repository, behind the ingress when
    there are several (a single model's deployment is the entry itself: one Ray hop fewer)."""
    from ray import serve

    from convserve.ray.deployments import Ingress, ModelServer
    from convserve.server.repository import RepositoryError, scan_disk

    root = resolve_repository(settings.server.model_repository)
    names = [name for name, on_disk in scan_disk(root).items() if on_disk.versions]
    if not names:
        raise RepositoryError(f"model repository {root} holds no models")
    options = model_deployment_options(settings)
    model_cls = serve.deployment(model_server or ModelServer)
    models = {
        name: model_cls.options(name=deployment_name(name), **options).bind(
            str(root), name, settings.server
        )
        for name in names
    }
    if len(models) == 1:
        return next(iter(models.values()))
    ingress = serve.deployment(Ingress).options(
        name=INGRESS_NAME,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
        logging_config=LOGGING,
    )
    return ingress.bind(str(root), models)


def build_app(args: Mapping[str, Any] | None = None):
    """Serve's application builder: `serve run convserve.ray:build_app min_replicas=2`, or
    `import_path: convserve.ray:build_app` with `args:` in a Serve config file."""
    return build(resolve(values=args))


def grpc_options(settings: RaySettings) -> dict[str, Any]:
    return {"port": settings.grpc_port, "grpc_servicer_functions": list(GRPC_SERVICERS)}


def message_limit(settings: RaySettings) -> int:
    """The gRPC message limit `convserve serve` would use for this repository."""
    from convserve.server.app import largest_image_bytes
    from convserve.server.app import message_limit as server_limit
    from convserve.server.repository import scan_disk

    if settings.server.max_message_bytes:
        return settings.server.max_message_bytes
    root = resolve_repository(settings.server.model_repository)
    paths = [p for on_disk in scan_disk(root).values() for p in on_disk.versions.values()]
    return server_limit(settings.server, largest_image_bytes(paths))


def connect(settings: RaySettings) -> None:
    """Start (address 'local') or join the Ray cluster."""
    import ray

    if settings.address == "local":
        # Ray's proxy reads its message limit from its environment: the local cluster inherits ours
        os.environ[MESSAGE_SIZE_ENV] = str(message_limit(settings))
        ray.init(
            address="local",  # a new cluster, even if this machine runs one (or has a stale record)
            num_cpus=settings.num_cpus or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=settings.address, logging_level=logging.WARNING)


def deploy(settings: RaySettings, model_server: type | None = None) -> None:
    """Start Serve's proxies (gRPC with our services) and deploy the application; returns once it
    runs (`model_server`: another model deployment class, for loadtest/ray_bench.py)."""
    from ray import serve

    serve.start(
        http_options={"host": "0.0.0.0", "port": settings.http_port},
        grpc_options=grpc_options(settings),
    )
    serve.run(build(settings, model_server), name=APP_NAME, blocking=False)


def start(settings: RaySettings, model_server: type | None = None) -> None:
    """Connect to (or start) the cluster and deploy."""
    connect(settings)
    deploy(settings, model_server)


def run(settings: RaySettings) -> int:
    """`convserve ray-serve`: deploy; with a local cluster serve until SIGTERM/SIGINT."""
    import ray
    from ray import serve

    connect(settings)
    stop = threading.Event()
    if settings.address == "local":  # after ray.init, which installs its own SIGTERM handler
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    deploy(settings)
    log.info(
        "application '%s' running: gRPC on port %d of every node (Ray Serve's proxy)",
        APP_NAME,
        settings.grpc_port,
    )
    if settings.address != "local":
        log.info(
            "deployed to the cluster at %s; it keeps running after this command", settings.address
        )
        return 0
    stop.wait()
    log.info("stopping: Serve, then the local Ray cluster")
    serve.shutdown()
    ray.shutdown()
    return 0

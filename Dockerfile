# convserve: batched image classification over the Open Inference Protocol (gRPC).
#
#   docker build -t convserve .
#   docker run -d --name convserve -p 8001:8001 -p 8002:8002 convserve
#   docker stop convserve        # SIGTERM: health NOT_SERVING, drain, exit 0
#
# The Numba kernels are compiled here, at build time, into /var/cache/convserve/numba, so a
# container answers SERVING a second or two after it starts instead of after 10-60 s of JIT.
# The root filesystem may be read-only (docker run --read-only --tmpfs /tmp; Kubernetes
# readOnlyRootFilesystem with an emptyDir at /tmp): the entry point copies that cache to
# NUMBA_CACHE_DIR under /tmp, the only path the server writes. The cache is keyed by the CPU's
# features: on a host with another CPU the kernels compile once at start-up into that copy.

# ---------------------------------------------------------------------------- build stage
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# A virtual environment at the path it keeps in the runtime stage (its scripts name it).
RUN python3 -m venv /opt/convserve

WORKDIR /src
# Dependencies first, from pyproject.toml alone: editing the code does not re-download them.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
 && /opt/convserve/bin/pip install -r requirements.txt

COPY README.md ./
COPY convserve/ convserve/
COPY core/ core/
COPY server/ server/
COPY client/ client/
COPY proto/ proto/
# A regular (not editable) install: the code lives in the venv's site-packages, compiled to
# .pyc by pip. pip and setuptools are of no use at run time (25 MB): out they go.
RUN /opt/convserve/bin/pip install --no-deps . \
 && /opt/convserve/bin/pip uninstall -y -q pip setuptools

# The model repository, readable by the runtime user whatever the checkout's file modes.
COPY models/ /models/
RUN chmod -R u=rwX,go=rX /models

# -------------------------------------------------------------------------- runtime stage
FROM python:3.11-slim

# libgomp1: Numba's OpenMP threading layer (the core requires it; the fallback is ~10x slower
# per parallel region). Not pinned: its version is whatever the base's Debian release ships.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

# The Numba cache directory is also writable by group 0, for platforms that run images under
# an arbitrary user id in group root (OpenShift); a cache miss then still compiles and caches.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin convserve \
 && install -d -o convserve -g 0 -m 0775 /var/cache/convserve/numba

COPY --from=build /opt/convserve /opt/convserve
COPY --from=build /models /models

ENV PATH=/opt/convserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/convserve-numba \
    CONVSERVE_MODEL_REPOSITORY=/models \
    CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_PORT=8001 \
    CONVSERVE_METRICS_PORT=8002 \
    CONVSERVE_GRACE_PERIOD=8

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# Compile every kernel the server's start-up warm-up runs (batch 1 and the default
# --max-batch-size 64), as the runtime user, into the seed cache directory and against the
# installed files: numba keys its cache by source path and mtime and by the CPU's features.
# The planner first times every kernel variant without its start-up time cap, so all of them
# are compiled here (and the plan cached) rather than at the container's start.
RUN NUMBA_CACHE_DIR=/var/cache/convserve/numba python3 -c "import glob; from convserve.core import Model, planner; \
models = [Model.load(p) for p in sorted(glob.glob('/models/*/*/model.safetensors'))]; \
[planner.plan_for(m.architecture, m.weights, seconds=120, largest_batch=64) for m in models]; \
[m.warmup((1, 64)) for m in models]"

COPY deploy/docker/entrypoint.sh /usr/local/bin/convserve-entrypoint

EXPOSE 8001 8002

# `convserve health` asks grpc.health.v1 of the server on CONVSERVE_PORT: no curl, no probe binary.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "exec convserve health --target 127.0.0.1:${CONVSERVE_PORT} --timeout 3"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["convserve-entrypoint"]
CMD ["serve"]

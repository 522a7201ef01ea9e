# Sourced by the CI scripts: a private Docker engine and a stand-in `python:3.11-slim` base.
#
# No image registry is reachable from CI (only package registries: PyPI, Debian), so the CI
# starts Debian's dockerd itself, in a temporary directory, with no bridge network, and makes
# the Dockerfile's base image from Debian packages with mmdebstrap. Every wait has a timeout;
# `engine_cleanup` (run it from an EXIT trap) removes containers, the engine and its mounts.

ENGINE_DIR=""
ENGINE_PID=""
DOCKER=/usr/bin/docker          # Debian's client (20.10) has BuildKit; a newer one on PATH may not
export DOCKER_BUILDKIT=1

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# install_engine_packages: docker.io and mmdebstrap from Debian, if missing.
install_engine_packages() {
  if [ -x /usr/sbin/dockerd ] && [ -x "$DOCKER" ] && command -v mmdebstrap >/dev/null; then
    return 0
  fi
  log "installing docker.io and mmdebstrap"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 900 apt-get install -y -qq --no-install-recommends docker.io mmdebstrap >/dev/null
}

# engine_start: a dockerd of our own under a fresh temporary directory; sets DOCKER_HOST.
engine_start() {
  ENGINE_DIR=$(mktemp -d /tmp/convserve-docker.XXXXXX)
  export DOCKER_HOST="unix://$ENGINE_DIR/docker.sock"
  /usr/sbin/dockerd \
    --data-root "$ENGINE_DIR/data" --exec-root "$ENGINE_DIR/exec" \
    --pidfile "$ENGINE_DIR/dockerd.pid" --host "$DOCKER_HOST" \
    --bridge=none --iptables=false --ip6tables=false \
    >"$ENGINE_DIR/dockerd.log" 2>&1 </dev/null &
  ENGINE_PID=$!
  local deadline=$((SECONDS + 60))
  until "$DOCKER" info >/dev/null 2>&1; do
    if ! kill -0 "$ENGINE_PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      log "dockerd did not come up; its log:"
      tail -n 30 "$ENGINE_DIR/dockerd.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
  log "dockerd $("$DOCKER" version --format '{{.Server.Version}}') up (pid $ENGINE_PID, $ENGINE_DIR)"
}

# engine_cleanup: remove every container, stop dockerd by its PID, unmount, delete the directory.
engine_cleanup() {
  [ -n "$ENGINE_DIR" ] || return 0
  if [ -n "$ENGINE_PID" ] && kill -0 "$ENGINE_PID" 2>/dev/null; then
    local ids
    ids=$(timeout 20 "$DOCKER" ps -aq 2>/dev/null || true)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      timeout 30 "$DOCKER" rm -f $ids >/dev/null 2>&1 || true
    fi
    kill -TERM "$ENGINE_PID" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while kill -0 "$ENGINE_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    kill -KILL "$ENGINE_PID" 2>/dev/null || true
    wait "$ENGINE_PID" 2>/dev/null || true
  fi
  # containerd-shims or the default netns can keep mounts under the engine directory.
  local mounts
  mounts=$(awk -v d="$ENGINE_DIR" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r)
  for m in $mounts; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$ENGINE_DIR"
  ENGINE_DIR=""
  ENGINE_PID=""
}

# make_base_image: Debian bookworm's Python 3.11 imported as `python:3.11-slim`.
# The stand-in differs from the real image in ways the Dockerfile must not care about
# (python in /usr/bin, not /usr/local/bin). Made usable here: PEP 668 marker removed, a
# `python` link, and this machine's extra certificate authorities trusted by apt, pip and
# Python (HTTPS to the package registries is verified against them on CI machines).
make_base_image() {
  local name=python:3.11-slim
  if "$DOCKER" image inspect "$name" >/dev/null 2>&1; then
    log "$name already present"
    return 0
  fi
  local tar="$ENGINE_DIR/base.tar"
  log "making the stand-in $name with mmdebstrap"
  timeout 900 mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-pip,python3-venv,ca-certificates \
    --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --customize-hook='ln -sf python3 "$1"/usr/bin/python' \
    --customize-hook='for c in /usr/local/share/ca-certificates/*.crt; do [ -e "$c" ] && cp "$c" "$1"/usr/local/share/ca-certificates/; done; chroot "$1" update-ca-certificates >/dev/null' \
    --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" > "$1"/etc/pip.conf' \
    bookworm "$tar" "deb http://deb.debian.org/debian bookworm main" </dev/null
  timeout 300 "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$tar" "$name" >/dev/null
  rm -f "$tar"
}

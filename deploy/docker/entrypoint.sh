#!/bin/sh
# The image's entry point: seed a writable Numba cache, then run `convserve "$@"`.
#
# Numba only uses a cache directory it can write to (it test-writes a file there first), and the
# root filesystem may be read-only (Kubernetes readOnlyRootFilesystem, docker run --read-only).
# The kernels compiled at build time live read-only in $SEED; they are copied once into
# $NUMBA_CACHE_DIR, which should be on a tmpfs or emptyDir (/tmp). A CPU other than the build
# machine's misses that cache and compiles into the same writable directory.
set -eu
SEED=/var/cache/convserve/numba

if [ -n "${NUMBA_CACHE_DIR:-}" ] && [ "$NUMBA_CACHE_DIR" != "$SEED" ] && [ -d "$SEED" ] \
    && [ ! -e "$NUMBA_CACHE_DIR/.seeded" ]; then
  if mkdir -p "$NUMBA_CACHE_DIR" 2>/dev/null && cp -R "$SEED/." "$NUMBA_CACHE_DIR/" \
      && touch "$NUMBA_CACHE_DIR/.seeded"; then
    :
  else
    echo "convserve: cannot write the Numba cache at $NUMBA_CACHE_DIR; with a read-only root," \
      "mount a tmpfs or emptyDir there (docker run --tmpfs /tmp)" >&2
  fi
fi
exec convserve "$@"

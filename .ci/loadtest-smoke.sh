#!/usr/bin/env bash
# The README's quickstart and a short load test against a real server on this machine:
# `convserve serve` (bundled model repository) -> health SERVING (timed) -> `convserve health`,
# `convserve models`, `convserve classify examples/*.png` -> real inferences through Triton's
# client -> a 20 s headless locust run (fails on any failed request, p99 over the bound, or
# top-1 accuracy under 0.8) -> a 4-minute soak (loadtest/soak.py) -> SIGTERM drains and the
# server exits 0.
# Figures go to stdout and to $OUT/loadtest-smoke.txt. Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${CONVSERVE_CI_OUT:-out/ci}
DURATION=${LOADTEST_DURATION:-20s}
USERS=${LOADTEST_USERS:-16}
P99_MS=${LOADTEST_P99_MS:-250}
MIN_ACCURACY=${CONVSERVE_CI_MIN_ACCURACY:-0.8}   # the bundled model scores about 0.9 on the test set
mkdir -p "$OUT"
RESULTS="$OUT/loadtest-smoke.txt"
: >"$RESULTS"
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
figure() { echo "$1: $2" | tee -a "$RESULTS"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

SERVER_PID=""
on_exit() {
  local rc=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -f "$OUT/server.log" ]; then
    log "server log (last 30 lines):"
    tail -n 30 "$OUT/server.log" >&2
  fi
  exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# The quickstart's commands as written, pointed at free ports through their environment
# variables (CI machines may already use 8001/8002).
export CONVSERVE_PORT=$(free_port) CONVSERVE_METRICS_PORT=$(free_port)
export CONVSERVE_TARGET=127.0.0.1:$CONVSERVE_PORT
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$PWD/.numba_cache}

start=$(date +%s.%N)
convserve serve >"$OUT/server.log" 2>&1 </dev/null &
SERVER_PID=$!
# A cold Numba cache compiles every kernel first (about 10-60 s on 2 busy cores).
python3 .ci/smoke.py wait --target "$CONVSERVE_TARGET" --since "$start" --timeout 300 | tee -a "$RESULTS"

# Every client command of the README's sh blocks (`convserve classify|models|health ...`, one
# line each) is run as written against this server, so the quickstart cannot rot;
# `localhost:8001` is pointed at this run's port.
python3 - README.md >"$OUT/readme-commands.sh" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for block in re.findall(r"```sh\n(.*?)```", text, re.S):
    for line in block.splitlines():
        command = line.split(" #")[0].strip()
        words = command.split()
        if words[:1] == ["convserve"] and words[1:2] and words[1] in ("classify", "models", "health") \
                and not command.endswith("\\"):
            print(command)
PY
[ -s "$OUT/readme-commands.sh" ] || { log "no convserve command found in README.md"; exit 1; }
while read -r command; do
  command=${command//localhost:8001/$CONVSERVE_TARGET}
  log "README: $command"
  timeout 60 sh -c "$command" </dev/null
done <"$OUT/readme-commands.sh"
figure readme_commands_run "$(wc -l <"$OUT/readme-commands.sh")"
timeout 120 python3 .ci/smoke.py infer --target "$CONVSERVE_TARGET" --images 1000 --min-accuracy "$MIN_ACCURACY" | tee -a "$RESULTS"

# --- the load test -------------------------------------------------------------------------
log "locust: $USERS users, $DURATION, p99 bound $P99_MS ms"
rc=0
timeout 300 locust -f loadtest/locustfile.py --headless --only-summary \
  -u "$USERS" -r "$USERS" -t "$DURATION" --stop-timeout 10 \
  --host "$CONVSERVE_TARGET" --csv "$OUT/loadtest" \
  --p99-ms "$P99_MS" --min-accuracy "$MIN_ACCURACY" >"$OUT/locust.log" 2>&1 || rc=$?
cat "$OUT/locust.log"
# The locustfile's own verdict line: requests, failures, req/s, p50, p99, accuracy.
grep -o 'convserve loadtest: .*' "$OUT/locust.log" | tee -a "$RESULTS" || true
figure locust_exit_code "$rc"
[ "$rc" -eq 0 ] || { log "load test failed (exit code $rc)"; exit 1; }

# --- soak: 4 minutes of mixed traffic (bad requests, cancellations, deadlines) against a server
# of its own: no failure, RSS growth bounded, metrics right, SIGTERM exits 0 ----------------------
timeout 720 python3 loadtest/soak.py --duration 4m --rate 40 | tee "$OUT/soak.log"
grep -o 'soak verdict: .*' "$OUT/soak.log" >>"$RESULTS"

# --- SIGTERM: drain and exit 0 within the grace period ----------------------------------------
python3 .ci/smoke.py drain --target "$CONVSERVE_TARGET" --grace 30 --pid "$SERVER_PID" | tee -a "$RESULTS"
code=0
wait "$SERVER_PID" || code=$?
SERVER_PID=""
figure server_exit_code "$code"
[ "$code" -eq 0 ] || { log "convserve serve exited with $code after SIGTERM"; exit 1; }
log "load test smoke: PASS"

#!/usr/bin/env bash
# The platform as local processes, one command (the native twin of `docker compose up`):
#   redis-server (started only if nothing answers at $REDIS_URL)
#   -> data build + feast apply + feast materialize
#   -> train (+ torchrun when TRAIN_NPROC > 1) + export to the model registry
#   -> server in the background (pid file + log under $USEREMBED_HOME/native)
#   -> refresh -> one GetUserEmbedding call (`userembed embed`).
# Every step is a `userembed` command; deploy/native/down.sh stops what this started.
#
# Environment (defaults): USEREMBED_HOME (./var), REDIS_URL (redis://127.0.0.1:6379/0),
# USEREMBED_SOURCE (synthetic), USEREMBED_USERS (5000), TRAIN_NPROC (1), TRAIN_MAX_STEPS (300),
# TRAIN_ARGS (more `userembed train` flags, e.g. "--batch-size 64"), TRAIN_RUN_ID (native),
# USEREMBED_GRPC_PORT (50051; 0 = any free port), USEREMBED_METRICS_PORT (9464; -1 = off),
# EMBED_USER_ID (42), USEREMBED_BIN (.venv/bin/userembed).
set -euo pipefail
cd "$(dirname "$0")/../.."

USEREMBED_BIN=${USEREMBED_BIN:-.venv/bin/userembed}
PYTHON=${PYTHON:-$(dirname "$USEREMBED_BIN")/python}
export USEREMBED_HOME=${USEREMBED_HOME:-$PWD/var}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/0}
SOURCE=${USEREMBED_SOURCE:-synthetic}
USERS=${USEREMBED_USERS:-5000}
NPROC=${TRAIN_NPROC:-1}
MAX_STEPS=${TRAIN_MAX_STEPS:-300}
TRAIN_ARGS=${TRAIN_ARGS:-}
GRPC_PORT=${USEREMBED_GRPC_PORT:-50051}
METRICS_PORT=${USEREMBED_METRICS_PORT:-9464}
EMBED_USER_ID=${EMBED_USER_ID:-42}
HEALTH_TIMEOUT_S=${HEALTH_TIMEOUT_S:-180}
STATE="$USEREMBED_HOME/native"
RUN_ID=${TRAIN_RUN_ID:-native}
mkdir -p "$STATE"

say() { echo "up: $*"; }
ue() { "$USEREMBED_BIN" "$@"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
redis_answers() {
  "$PYTHON" -c 'import sys, redis; redis.Redis.from_url(sys.argv[1], socket_timeout=2).ping()' \
    "$REDIS_URL" >/dev/null 2>&1
}
# the URL as this script prints it: without its password
REDIS_SHOWN=$("$PYTHON" -c 'import sys; from userembed.redis_urls import redacted
print(redacted(sys.argv[1]))' "$REDIS_URL")

if alive "$STATE/server.pid"; then
  echo "up: a server started by up.sh is running (pid $(cat "$STATE/server.pid")):" \
    "run deploy/native/down.sh first" >&2
  exit 1
fi

# 1. Redis: reuse whatever answers; otherwise start a local one on the URL's port.
if redis_answers; then
  say "redis answers at $REDIS_SHOWN"
else
  read -r host port < <("$PYTHON" -c 'import sys, urllib.parse as u
p = u.urlparse(sys.argv[1]); print(p.hostname or "127.0.0.1", p.port or 6379)' "$REDIS_URL")
  case "$host" in
    127.0.0.1 | localhost) ;;
    *) echo "up: nothing answers at $REDIS_SHOWN and it is not local: start it first" >&2; exit 1 ;;
  esac
  say "starting redis-server on 127.0.0.1:$port (pid file $STATE/redis.pid)"
  # No persistence: the online store and the vectors are rebuilt by this script.
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log" --dir "$STATE"
  for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
  redis_answers || { echo "up: redis-server did not answer (see $STATE/redis.log)" >&2; exit 1; }
fi

# 2. Features: raw tables -> offline parquet -> Feast registry -> Redis online store.
say "data build ($SOURCE, $USERS users), feast apply, feast materialize"
ue data build --source "$SOURCE" --users "$USERS"
# --fresh: online rows of an earlier run (other source or size) would shadow these
ue feast apply --fresh
ue feast materialize

# 3. Train (torchrun when TRAIN_NPROC > 1), then export + publish (alias latest).
say "train ($NPROC process(es), $MAX_STEPS steps) and export"
# `train` writes $USEREMBED_HOME/runs/<run id>/, which `export` reads.
# shellcheck disable=SC2086  # TRAIN_ARGS: more `userembed train` flags, split on spaces
ue train --run-id "$RUN_ID" --nproc "$NPROC" --max-steps "$MAX_STEPS" $TRAIN_ARGS
ue export --run "$USEREMBED_HOME/runs/$RUN_ID" --model-name supermoe

# 4. Server in the background; healthy once the model is loaded.
say "starting the server (log $STATE/server.log)"
nohup "$USEREMBED_BIN" serve --port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
  >"$STATE/server.log" 2>&1 </dev/null &
echo $! >"$STATE/server.pid"
port=""
deadline=$((SECONDS + HEALTH_TIMEOUT_S))
while :; do
  if ! alive "$STATE/server.pid"; then
    echo "up: the server exited; last lines of $STATE/server.log:" >&2
    tail -n 20 "$STATE/server.log" >&2
    rm -f "$STATE/server.pid"
    exit 1
  fi
  # `serve` prints "listening on HOST:PORT" once bound and loaded (PORT is real with port 0).
  if [ -z "$port" ]; then
    port=$(sed -n 's/^listening on .*:\([0-9][0-9]*\).*/\1/p' "$STATE/server.log" | head -n 1)
  fi
  if [ -n "$port" ] && ue health --target "127.0.0.1:$port" >/dev/null 2>&1; then
    break
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "up: the server is not SERVING after ${HEALTH_TIMEOUT_S}s (see $STATE/server.log)" >&2
    exit 1
  fi
  sleep 1
done
echo "$port" >"$STATE/server.port"
say "server SERVING on 127.0.0.1:$port (pid $(cat "$STATE/server.pid"))"

# 5. Nightly refresh, run once now: a new embedding version, validated, then the pointer flip.
say "refresh"
ue refresh --model supermoe

# 6. One call through the public API.
say "GetUserEmbedding for user $EMBED_USER_ID"
ue embed --user-id "$EMBED_USER_ID" --target "127.0.0.1:$port"
say "done: server on 127.0.0.1:$port; stop everything with deploy/native/down.sh"

#!/usr/bin/env bash
# Stops what deploy/native/up.sh started: the server (SIGTERM: it drains in-flight calls, then
# SIGKILL after DOWN_TIMEOUT_S) and redis-server only if up.sh started it (its pid file).
# A Redis that was already running is left alone. --purge also deletes $USEREMBED_HOME.
set -euo pipefail
cd "$(dirname "$0")/../.."

export USEREMBED_HOME=${USEREMBED_HOME:-$PWD/var}
STATE="$USEREMBED_HOME/native"
DOWN_TIMEOUT_S=${DOWN_TIMEOUT_S:-30}
purge=0
for arg in "$@"; do
  case "$arg" in
    --purge) purge=1 ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
  esac
done

running() {  # a live process, not a zombie waiting for a parent that never reaps it
  kill -0 "$1" 2>/dev/null && ! grep -qE '^[0-9]+ \(.*\) Z ' "/proc/$1/stat" 2>/dev/null
}

stop_pid_file() {  # name, pid file, command-line pattern: TERM, wait, KILL
  local name=$1 file=$2 pattern=$3 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  # A stale pid file may name a recycled pid: only signal a process that is what we started.
  if running "$pid" && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pattern"; then
    echo "down: pid $pid is no longer $name: leaving it alone" >&2
  elif running "$pid"; then
    echo "down: stopping $name (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq $((DOWN_TIMEOUT_S * 10))); do running "$pid" || break; sleep 0.1; done
    if running "$pid"; then
      echo "down: $name did not stop in ${DOWN_TIMEOUT_S}s: SIGKILL" >&2
      kill -KILL "$pid"
    fi
  fi
  rm -f "$file"
}

stop_pid_file server "$STATE/server.pid" "userembed serve"
rm -f "$STATE/server.port"
stop_pid_file redis-server "$STATE/redis.pid" "redis-server"

if [ "$purge" = 1 ]; then
  echo "down: deleting $USEREMBED_HOME"
  rm -rf "$USEREMBED_HOME"
fi
echo "down: done"

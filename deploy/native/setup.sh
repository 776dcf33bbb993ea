#!/usr/bin/env bash
# One install step for a fresh machine (Debian/Ubuntu, Python 3.11): a virtual environment in
# .venv with every extra, torchrec (--no-deps, see pyproject.toml), the MovieLens-100K files
# (recbole wheel, --no-deps, never imported), generated gRPC code, and redis-server from Debian
# when it is missing. Idempotent: a second run with unchanged inputs returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
STAMP="$VENV/.userembed-installed"
inputs_hash=$(cat pyproject.toml deploy/native/setup.sh | sha256sum | cut -d' ' -f1)

# System packages from Debian: redis-server (the online store and vector store),
# docker-compose 1.29 (validates docker-compose.yml in the tests; no Docker engine needed) and
# chromium (the headless browser that tests/ui/ opens the web page of `userembed ui` with).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} from Debian"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$inputs_hash" ]; then
  echo "setup: $VENV is up to date"
else
  echo "setup: building $VENV (about 2-3 minutes on a fresh machine)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, exactly pinned, so nothing pulls a CUDA build of a newer release.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e '.[serve,refresh,train,dev]'
  "$VENV/bin/pip" install -q --no-deps torchrec==1.8.0 recbole==1.2.1
  echo "$inputs_hash" > "$STAMP"
fi

# Generated protobuf / gRPC code (excluded from git and lint).
if [ -x protos/generate.sh ]; then
  VENV="$VENV" protos/generate.sh
fi
echo "setup: done"

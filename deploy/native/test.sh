#!/usr/bin/env bash
# Runs the test suite: lint (ruff check, ruff format --check), types (mypy on the packages and
# on the bench scripts, which pyproject's discovery excludes: they are checked as bench.*), then
# pytest. Tests start their own Redis servers on free ports (tests/conftest.py), so nothing here
# depends on a Redis already running.
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy userembed embed_server trainer refresh
.venv/bin/mypy --explicit-package-bases bench/*.py
# One math thread per process: the suite runs several torch / onnxruntime processes at once on
# small machines, and oversubscribed thread pools slow them by orders of magnitude.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -ra "$@"

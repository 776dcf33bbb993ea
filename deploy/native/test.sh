#!/usr/bin/env bash
# Runs the test suite: lint, then pytest. Tests start their own Redis servers on free ports
# (tests/conftest.py), so nothing here depends on a Redis already running.
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -ra "$@"

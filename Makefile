# The two commands of the README. Everything else is `userembed <command>` (see README).
.PHONY: demo test lint setup

setup:
	deploy/native/setup.sh

demo: setup
	.venv/bin/userembed demo

test: setup
	deploy/native/test.sh

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy userembed trainer embed_server refresh \
	  && .venv/bin/mypy --explicit-package-bases bench/*.py

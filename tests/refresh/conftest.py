"""Refresh fixtures: a real model registry in the test's folder (the session's real Redis is
the `redis_url` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from userembed.registry import Registry


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")

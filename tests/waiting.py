"""Waiting in tests for something another thread, process or server does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], what: str = "the condition", timeout: float = 60.0) -> T:
    """Poll `cond` every 50 ms until it returns a truthy value, and return that value. A guard
    against hanging, not a timing assertion: past `timeout` seconds, AssertionError naming
    `what`."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value

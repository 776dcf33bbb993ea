"""The event loop the server runs on: uvloop when it is installed (the default), else asyncio's.

Why uvloop: grpc.aio runs on it unchanged and a stored call costs the server less CPU there
(BENCHMARKS.md, serving); `feast serve` (uvicorn) picks uvloop the same way. `event_loop:
asyncio` is there to rule the loop out when debugging.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from embed_server.settings import EVENT_LOOPS, SettingsError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def loop_factory(name: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """`name` (auto / uvloop / asyncio) -> (the loop actually chosen, its factory).
    auto: uvloop when importable, else asyncio; uvloop when it is not installed: an error."""
    if name not in EVENT_LOOPS:
        raise SettingsError(f"event_loop {name!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if name != "asyncio":
        try:
            import uvloop
        except ImportError as e:
            if name == "uvloop":
                raise SettingsError(
                    "event_loop 'uvloop' asked for but uvloop is not installed "
                    "(pip install 'userembed[serve]', or set event_loop: auto)"
                ) from e
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], name: str = "auto") -> T:
    """asyncio.run(main) on the chosen loop (no global event loop policy is installed)."""
    try:
        chosen, factory = loop_factory(name)
    except BaseException:
        main.close()  # never awaited: close it so Python does not warn
        raise
    logger.info("event loop: %s", chosen)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)

"""The server's event loop choice: uvloop by default, asyncio on request or without uvloop."""

from __future__ import annotations

import asyncio
import sys

import pytest

from embed_server.event_loop import loop_factory, run
from embed_server.settings import SettingsError, load_settings


async def _loop_module() -> str:
    await asyncio.sleep(0)  # suspends once: the loop really runs it
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_when_installed():
    assert load_settings(env={}).event_loop == "auto"
    assert loop_factory("auto")[0] == "uvloop"
    assert run(_loop_module()).startswith("uvloop")


def test_asyncio_is_asyncios_own_loop():
    assert run(_loop_module(), "asyncio").startswith("asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    assert loop_factory("auto")[0] == "asyncio"
    coro = _loop_module()
    with pytest.raises(SettingsError, match="uvloop is not installed"):
        run(coro, "uvloop")
    assert coro.cr_frame is None  # closed, not left to warn "never awaited"


def test_unknown_loop_is_rejected():
    with pytest.raises(SettingsError, match="event_loop must be one of auto, uvloop, asyncio"):
        load_settings(env={"USEREMBED_EVENT_LOOP": "trio"})
    with pytest.raises(SettingsError, match="event_loop 'trio'"):
        loop_factory("trio")

"""Child processes that the demo and the benchmarks run beside themselves (servers, workers).

`start` runs a command and returns once it prints its ready line (a server's `listening on
HOST:PORT`); `stop` asks it to finish with SIGTERM, so a server drains, and kills it only when
it does not stop in time.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

from userembed.errors import UserEmbedError

# What a server (`userembed serve`, the benchmark's echo server) prints once bound.
LISTENING = "listening on"


def listening_address(line: str) -> str:
    """HOST:PORT out of a `listening on HOST:PORT[, more]` line."""
    return line.split(LISTENING, 1)[1].strip().split(",")[0]


def start(
    argv: Sequence[str], env: Mapping[str, str], ready: str, timeout_s: float = 120
) -> tuple[subprocess.Popen[str], str]:
    """Start `argv` (stdout and stderr piped together); return it and its first line holding
    `ready`, stripped. UserEmbedError with its last lines when it exits or `timeout_s` passes
    first (then it is killed)."""
    proc = subprocess.Popen(
        list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    out = proc.stdout
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = out.readline()
        if not line:
            tail = "\n".join(lines[-20:])
            code = proc.wait()
            raise UserEmbedError(
                f"{argv[0]} exited ({code}) before it was ready; last lines:\n{tail}"
            )
        lines.append(line.rstrip())
        if ready in line:
            # Keep reading its output so that a chatty child never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in out], daemon=True).start()
            return proc, line.strip()
    proc.kill()
    proc.wait()
    tail = "\n".join(lines[-20:])
    raise UserEmbedError(
        f"{argv[0]} was not ready within {timeout_s:.0f}s; its last lines:\n{tail}"
    )


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM, wait up to `timeout_s` for it to finish, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

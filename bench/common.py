"""What several benchmarks share: progress lines, free ports, a private redis-server, the
generated sections of BENCHMARKS.md and their chart links, an encoder spec for random inputs,
raw onnxruntime speed.

The scripts run as `python bench/X.py` and import this as `bench.common` (each puts the
repository root on sys.path first).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from userembed.features import InputSpec

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def log(msg: str) -> None:
    """One timestamped progress line on stderr (stdout ends with the result's JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of its own on a free port (nothing kept on disk); yields its URL.
    `workdir` is made if missing: redis-server refuses a `dir` that does not exist, which
    would surface only as "no Redis answers"."""
    from userembed.local_redis import redis_server_argv, wait_until_up

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(redis_server_argv(port, workdir), stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_until_up(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write_section(md: str, begin: str, end: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the generated section `md` between the markers `begin` ... `end` of `path`
    (appended when absent). `begin` is found by its text before " (": the note after it may
    change without orphaning the section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    tag = begin.split(" (")[0]
    if tag in text and end in text:
        text = text[: text.index(tag)] + md + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + md + "\n"
    path.write_text(text)


def doc_path(path: Path) -> str:
    """A file's path as BENCHMARKS.md (at the repository root) links it (a chart)."""
    try:
        return str(path.resolve().relative_to(BENCHMARKS_MD.parent.resolve()))
    except ValueError:  # an --out outside the repository
        return str(path.resolve())


def input_spec(sequence_length: int, sizes: Mapping[str, int]) -> InputSpec:
    """Every sequence and profile feature with the table sizes `sizes` (by feature name): the
    spec of an encoder fed random inputs, no data set needed."""
    from userembed.features import (
        BEHAVIOR_VIEW,
        PROFILE_FEATURES,
        PROFILE_VIEW,
        SEQUENCE_FEATURES,
        FeatureSpec,
        InputSpec,
    )

    return InputSpec(
        sequence_length=sequence_length,
        sequence_features=tuple(FeatureSpec(f, sizes[f], BEHAVIOR_VIEW) for f in SEQUENCE_FEATURES),
        profile_features=tuple(FeatureSpec(f, sizes[f], PROFILE_VIEW) for f in PROFILE_FEATURES),
    )


def raw_onnxruntime(
    onnx_path: Path, dim: int, inputs: Mapping[str, np.ndarray], seconds: float
) -> float:
    """users/s of onnxruntime alone (the server's encoder class, 2 intra-op threads) running
    the pre-encoded batch `inputs` over and over for `seconds`, after one warm-up run."""
    from userembed.onnx_encoder import OnnxEncoder

    enc = OnnxEncoder(onnx_path, dim, intra_op_threads=2)
    batch = len(next(iter(inputs.values())))
    enc.run(inputs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        enc.run(inputs)
        n += batch
    return n / (time.perf_counter() - t0)

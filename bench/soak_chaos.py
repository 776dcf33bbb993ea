"""The soak benchmark's faults, on a schedule, and what each one did.

- `redis_restart`: SIGKILL the benchmark's redis-server, wait, start it again on the same port.
  It runs with an append-only file (fsync every second, the usual production setting), so the
  stored vectors and the Feast rows survive; callers see a burst of UNAVAILABLE, then recovery.
- `hot_load`: publish a new model version (the synthetic encoder with other read-out weights)
  and move the `latest` alias the server follows; done once the server's ListModels names it.
- `refresh`: the refresh job (`refresh.job.refresh`, what `userembed refresh` runs) of the
  loaded version, in a process of its own; done once the server reads from the embedding version
  it wrote (the pointer flip).
- `corrupt_model`: publish a version whose ONNX file no longer matches its manifest's sha256 and
  move `latest` to it; done once the server counts it refused (its metric), and it must still
  serve the version before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import free_port, log
from bench.serving_data import DIM, MODEL, encode_all, synthetic_encoder
from bench.soak_traffic import Checker, Truth
from embed_server._proto import embedding_service_pb2 as pb
from embed_server._proto import embedding_service_pb2_grpc as pb_grpc
from refresh.config import RefreshConfig
from userembed.local_redis import redis_server_argv, wait_until_up
from userembed.manifest import single_onnx_manifest
from userembed.registry import LATEST, Registry

REDIS_RESTART, HOT_LOAD, REFRESH, CORRUPT_MODEL = (
    "redis_restart",
    "hot_load",
    "refresh",
    "corrupt_model",
)
FAULT_KINDS = (REDIS_RESTART, HOT_LOAD, REFRESH, CORRUPT_MODEL)
OFFSETS = (0.15, 0.35, 0.55, 0.75)  # where in each cycle each fault starts
CYCLE_S = 120.0  # about one cycle of every fault per two minutes
OBSERVE_TIMEOUT_S = 30.0  # a fault whose effect the server does not show by then: not observed


@dataclass
class Fault:
    kind: str
    at_s: float  # scheduled start, seconds after the traffic started
    started_s: float | None = None
    ended_s: float | None = None  # the fault is over (Redis up again, model loaded, ...)
    observed: bool = False  # the server showed the fault's expected effect
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def schedule(seconds: float) -> list[Fault]:
    """One cycle of every fault per about CYCLE_S seconds (at least one cycle)."""
    cycles = max(1, round(seconds / CYCLE_S))
    length = seconds / cycles
    return [
        Fault(kind, round(c * length + off * length, 1))
        for c in range(cycles)
        for kind, off in zip(FAULT_KINDS, OFFSETS, strict=True)
    ]


class RedisProcess:
    """The benchmark's own redis-server on a free port, with an append-only file so that a
    restart keeps the data: `crash` kills it, `start` brings it back on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = redis_server_argv(
            self.port, self.workdir, "--appendonly", "yes", "--appendfsync", "everysec"
        )
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        wait_until_up(self.url, timeout_s=60)

    def crash(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc = None

    def dbsize(self) -> int:
        import redis

        with redis.Redis.from_url(self.url) as r:
            return int(r.dbsize())  # type: ignore[arg-type]


@dataclass(frozen=True)
class StagedModel:
    """A model version waiting in a staging folder, with the vectors it gives every user."""

    directory: Path
    vectors: np.ndarray | None  # (users, D); None for a version published corrupt


def variant_encoder(spec: Any, seed: int) -> Any:
    """The serving bench's synthetic encoder with read-out weights drawn from `seed`: every
    variant gives every user another vector."""
    from onnx import numpy_helper

    model = synthetic_encoder(spec)
    for init in model.graph.initializer:
        if init.name == "w_out":
            shape = numpy_helper.to_array(init).shape
            w = np.random.default_rng(seed).normal(size=shape) * 0.1
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), "w_out"))
    return model


def stage_model(root: Path, spec: Any, rows: dict[str, Any] | None, seed: int) -> StagedModel:
    """The variant of `seed` in a staging folder, with its vectors of every user of `rows`
    computed here by onnxruntime (none without `rows`)."""
    import onnx

    d = root / "soak-staging" / f"v{seed}"
    d.mkdir(parents=True)
    onnx.save(variant_encoder(spec, seed), str(d / "encoder.onnx"))
    return StagedModel(d, None if rows is None else encode_all(d / "encoder.onnx", spec, rows))


def _import_refresh() -> None:
    import refresh.job  # noqa: F401 - paid once, when the pool starts, not by the first fault


def run_refresh(cfg: RefreshConfig) -> dict[str, Any]:
    """One refresh run (in the refresher process): its summary as a dict."""
    from refresh.job import refresh

    return dataclasses.asdict(refresh(cfg))


def consistency(check: dict[str, Any] | None) -> str:
    """The refresh's consistency check (its summary's `check`) in a word or two."""
    if check is None:
        return "off"
    if "ok" in check:
        return f"consistent ({check.get('users')} users)" if check["ok"] else "MISMATCH"
    return "skipped" if "skipped" in check else "error"


def scrape_counter(metrics_url: str, name: str, label: str) -> float:
    """The sum of the Prometheus counter `name` over the series whose labels hold `label`."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and label in line
    )


class Chaos:
    """Runs the faults in order, each at its time (or when the one before is done), and records
    what each did. `current` is the good model version the server should serve."""

    def __init__(
        self,
        *,
        faults: list[Fault],
        redis: RedisProcess,
        registry: Registry,
        spec: Any,
        staged: list[StagedModel],  # with vectors: for hot loads; without: to publish corrupt
        truth: Truth,
        checker: Checker,
        target: str,
        metrics_url: str,
        refresh_cfg: RefreshConfig,
        current: str,
        redis_down_s: float,
        now: Callable[[], float],
    ) -> None:
        self.faults, self.redis, self.registry, self.spec = faults, redis, registry, spec
        self.staged, self.truth, self.checker = list(staged), truth, checker
        self.metrics_url, self.refresh_cfg, self.current = metrics_url, refresh_cfg, current
        self.redis_down_s, self.now = redis_down_s, now
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.UserEmbeddingServiceStub(self.channel)
        # refreshes run in a process of their own (the refresh job's function, not the CLI),
        # started now so that the first refresh does not pay its imports
        self.refresher = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.refresher.submit(_import_refresh)

    async def run(self) -> None:
        actions: dict[str, Callable[[Fault], Awaitable[None]]] = {
            REDIS_RESTART: self._redis_restart,
            HOT_LOAD: self._hot_load,
            REFRESH: self._refresh,
            CORRUPT_MODEL: self._corrupt,
        }
        try:
            for f in self.faults:
                await asyncio.sleep(max(0.0, f.at_s - self.now()))
                f.started_s = self.now()
                try:
                    await actions[f.kind](f)
                except Exception as e:  # noqa: BLE001 - reported as a fault not observed
                    f.detail = f"{f.detail} failed: {type(e).__name__}: {e}".strip()
                f.ended_s = f.ended_s or self.now()
                log(f"{f.kind} at {f.started_s:.1f}s: {f.detail}")
        finally:
            await self.channel.close()
            self.refresher.shutdown(cancel_futures=True)

    async def _served(self) -> Any:
        return (await self.stub.ListModels(pb.ListModelsRequest(), timeout=5)).models[0]

    async def _wait_for(self, test: Callable[[Any], bool]) -> float | None:
        """Seconds until ListModels' model passes `test`; None after OBSERVE_TIMEOUT_S."""
        t0 = self.now()
        while self.now() - t0 < OBSERVE_TIMEOUT_S:
            try:
                if test(await self._served()):
                    return self.now() - t0
            except Exception as e:  # noqa: BLE001 - an RPC error while Redis is down: poll on
                log(f"ListModels: {type(e).__name__}")
            await asyncio.sleep(0.1)
        return None

    def _first_answer(self, version: str, f: Fault) -> dict[str, float]:
        """When the first answer from `version` (a model or embedding version) came, seconds
        after the fault started."""
        t = self.checker.first_seen.get(version)
        return {} if t is None else {"first_answer_s": round(t - (f.started_s or 0.0), 2)}

    async def _redis_restart(self, f: Fault) -> None:
        before = await asyncio.to_thread(self.redis.dbsize)
        self.redis.crash()
        await asyncio.sleep(self.redis_down_s)
        await asyncio.to_thread(self.redis.start)
        f.ended_s = self.now()
        after = await asyncio.to_thread(self.redis.dbsize)
        f.observed = after > 0
        f.data = {"down_s": round(f.ended_s - (f.started_s or 0), 2), "keys": [before, after]}
        f.detail = f"killed, up again after {f.data['down_s']:.1f}s; keys {before} -> {after}"

    def _publish(self, staged: StagedModel, corrupt: bool = False) -> str:
        """Publish without moving an alias (the caller moves `latest` once the benchmark knows
        the version's vectors); `corrupt` then damages the published ONNX file."""
        manifest = single_onnx_manifest(MODEL, staged.directory, self.spec, DIM)
        version = self.registry.publish(manifest, staged.directory, aliases=()).version
        if corrupt:
            path = Path(self.registry.version_dir(MODEL, version)) / "encoder.onnx"
            data = bytearray(path.read_bytes())
            data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # still parses as ONNX
            path.write_bytes(bytes(data))
        return version

    async def _hot_load(self, f: Fault) -> None:
        staged = next(s for s in self.staged if s.vectors is not None)
        self.staged.remove(staged)
        version = await asyncio.to_thread(self._publish, staged)
        assert staged.vectors is not None
        self.truth.add_model(version, staged.vectors)
        self.registry.set_alias(MODEL, LATEST, version)
        took = await self._wait_for(lambda m: m.version == version)
        f.ended_s, f.observed = self.now(), took is not None
        if f.observed:
            self.current = version
        f.data = {"version": version, "loaded_after_s": took, **self._first_answer(version, f)}
        f.detail = f"{version} published; " + (
            f"served after {took:.1f}s" if took is not None else "never loaded"
        )

    async def _refresh(self, f: Fault) -> None:
        cfg = dataclasses.replace(self.refresh_cfg, model_ref=self.current)
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        summary = await loop.run_in_executor(self.refresher, run_refresh, cfg)
        seconds = time.monotonic() - t0
        ev = summary["embedding_version"]
        self.truth.add_embedding_version(ev, summary["model_version"])
        took = await self._wait_for(lambda m: m.serving_embedding_version == ev)
        f.ended_s, f.observed = self.now(), took is not None
        check = consistency(summary.get("check"))
        f.data = {"embedding_version": ev, "users": summary["users"], "seconds": round(seconds, 1),
                  "check": check, "flip_seen_after_s": took,
                  **self._first_answer(ev, f)}  # fmt: skip
        f.detail = f"{ev}: {summary['users']} users in {seconds:.1f}s, check {check}; " + (
            f"server reads it {took:.1f}s later" if took is not None else "server never read it"
        )

    async def _corrupt(self, f: Fault) -> None:
        refused = "userembed_model_reloads_total", 'outcome="refused"'
        before = await asyncio.to_thread(scrape_counter, self.metrics_url, *refused)
        staged = next(s for s in self.staged if s.vectors is None)
        self.staged.remove(staged)
        version = await asyncio.to_thread(self._publish, staged, True)
        self.registry.set_alias(MODEL, LATEST, version)
        t0, took = self.now(), None
        while self.now() - t0 < OBSERVE_TIMEOUT_S:
            if await asyncio.to_thread(scrape_counter, self.metrics_url, *refused) > before:
                took = self.now() - t0
                break
            await asyncio.sleep(0.1)
        served = (await self._served()).version
        f.ended_s = self.now()
        f.observed = took is not None and served == self.current
        f.data = {"version": version, "refused_after_s": took, "served_version": served}
        f.detail = (
            f"{version} published; "
            + (f"refused after {took:.1f}s" if took is not None else "never refused")
            + f", still serving {served}"
        )

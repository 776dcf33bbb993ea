"""Server settings: one typed, frozen object from defaults < YAML file < `USEREMBED_*` env.

Every field can be set in a YAML file (unknown keys are rejected) or by the environment variable
`USEREMBED_<FIELD>` (upper case; tuples are comma separated). Redis auth and TLS go through the
URL: `rediss://user:password@host:6380/0`; Redis Cluster by its scheme: `redis+cluster://host:6379`
(userembed/redis_urls.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from userembed import paths
from userembed.errors import InvalidInputError

logger = logging.getLogger(__name__)

ENV_PREFIX = "USEREMBED_"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")  # embed_server/event_loop.py


def usable_cores() -> int:
    """CPUs this process may run on: the affinity mask (taskset, a container's cpuset), capped
    by a cgroup v2 CPU quota (a Kubernetes CPU limit), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _cgroup_cpu_quota() or cores))


def _cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """`quota period` from cgroup v2 -> CPUs (rounded up); None: no limit or no cgroup v2."""
    try:
        quota, period = Path(path).read_text().split()[:2]
        return -(-int(quota) // int(period))
    except (OSError, ValueError):  # absent, "max 100000" (no limit), or unreadable
        return None


class SettingsError(InvalidInputError):
    """A settings file or variable that cannot be used."""


@dataclass(frozen=True)
class ServerSettings:
    # network
    host: str = "127.0.0.1"
    grpc_port: int = 50051  # 0: any free port (the bound port is printed and logged)
    metrics_port: int = 9464  # Prometheus HTTP; 0: any free port; -1: disabled
    tls_cert: str = ""  # PEM paths; both set -> the gRPC port serves TLS
    tls_key: str = ""
    # PEM CA bundle; set (with tls_cert) -> mutual TLS: every client presents a certificate
    # this CA signed, or the handshake fails
    tls_client_ca: str = ""
    # accepted bearer tokens, one per line (a mounted Secret, re-read every reload_interval_s);
    # set -> every call but health needs the metadata `authorization: Bearer <token>`
    auth_token_file: str = ""
    # models
    registry_root: str = field(default_factory=paths.registry_root)
    models: tuple[str, ...] = ()  # served models; empty: every model in the registry
    default_model: str = ""  # empty: the first served model
    model_alias: str = "latest"  # registry alias followed by hot reload
    reload_interval_s: float = 5.0  # registry alias and Redis pointer poll period
    # PEM public key that every loaded manifest must be signed with (userembed/signing.py);
    # empty: no check
    model_verify_key: str = field(default_factory=paths.model_verify_key)
    # onnxruntime threads per encoder run; 0: cores // (compute_workers * workers) (at least
    # 1), so the runs that the workers overlap do not oversubscribe the cores (docs/serving.md)
    intra_op_threads: int = 0
    # 0: idle onnxruntime threads sleep instead of busy-waiting between runs, leaving the cores
    # to the event loop and the feature reads (see docs/serving.md, miss path)
    intra_op_spinning: int = 0
    # backends
    redis_url: str = field(default_factory=paths.redis_url)
    feature_repo: str = field(default_factory=lambda: str(paths.FEATURE_REPO))
    vector_ttl_s: int = 7 * 24 * 3600  # TTL of vectors written back after a miss
    # 1: one Lua call per read batch; 0: a pipeline of HMGETs. A cluster URL always pipelines
    redis_script_reads: int = 1
    # stored reads that come clustered (a busy server) wait up to this long to share one Redis
    # round trip; a lone caller never waits (redis_reads.ReadCoalescer). 0: never wait
    read_hold_ms: float = 2.0
    # request limits and batching
    max_batch_ids: int = 1000  # ids per BatchGetUserEmbeddings call
    max_user_id_length: int = 128
    batch_size: int = 64  # micro-batch: most users per feature read + encoder run
    batch_wait_ms: float = 2.0  # micro-batch: longest wait for a batch to fill
    compute_workers: int = 2  # micro-batches computed at once (features overlap the encoder)
    # pending users per model (compute), and pending stored reads, before RESOURCE_EXHAUSTED
    queue_size: int = 4096
    # embedding calls in flight per server process before RESOURCE_EXHAUSTED (health is not
    # counted: probes still answer on a busy server); 0: no cap
    max_concurrent_rpcs: int = 512
    drain_grace_s: float = 10.0  # on SIGTERM: NOT_SERVING, finish in-flight calls, then stop
    # server processes sharing the gRPC port (embed_server/workers.py); 0: usable_cores();
    # 1: one process, no parent
    workers: int = 0
    # per worker: bytes of stored vectors kept in memory (embed_server/vector_cache.py); 0: off
    vector_cache_mb: float = 64.0
    # freshness (docs/freshness.md): a stored vector older than behaviour pushed for its user
    # is served and recomputed in the background, or recomputed inline once the newest pushed
    # event is more than this many seconds old; 0: always serve the stale vector
    max_stale_s: float = 0.0
    # stale users being recomputed in the background at once, per worker; more are dropped
    # (counted) and tried again at their next read
    stale_refresh_queue: int = 1024
    # auto: uvloop when installed (less CPU per call, docs/serving.md), else asyncio's loop
    event_loop: str = "auto"

    def encoder_threads(self) -> int:
        """intra_op_threads, with 0 resolved against this machine's cores."""
        if self.intra_op_threads > 0:
            return self.intra_op_threads
        return max(1, usable_cores() // (max(1, self.compute_workers) * self.worker_count()))

    def worker_count(self) -> int:
        """workers, with 0 resolved against this machine's cores."""
        return self.workers if self.workers > 0 else usable_cores()

    def __post_init__(self) -> None:
        problems = []
        if self.intra_op_threads < 0:
            problems.append("intra_op_threads must be >= 0 (0: automatic)")
        if self.read_hold_ms < 0:
            problems.append("read_hold_ms must be >= 0 (0: never hold)")
        if self.workers < 0:
            problems.append("workers must be >= 0 (0: one per usable core)")
        if self.vector_cache_mb < 0:
            problems.append("vector_cache_mb must be >= 0 (0: off)")
        if self.max_stale_s < 0:
            problems.append("max_stale_s must be >= 0 (0: no limit)")
        if self.stale_refresh_queue < 1:
            problems.append("stale_refresh_queue must be >= 1")
        if self.compute_workers < 1:
            problems.append("compute_workers must be >= 1")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if self.queue_size < 1:
            problems.append("queue_size must be >= 1")
        if self.max_concurrent_rpcs < 0:
            problems.append("max_concurrent_rpcs must be >= 0 (0: no cap)")
        if self.max_batch_ids < 1:
            problems.append("max_batch_ids must be >= 1")
        if self.max_user_id_length < 1:
            problems.append("max_user_id_length must be >= 1")
        if self.event_loop not in EVENT_LOOPS:
            problems.append(f"event_loop must be one of {', '.join(EVENT_LOOPS)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key must be set together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS)")
        if self.default_model and self.models and self.default_model not in self.models:
            problems.append(f"default_model {self.default_model!r} is not in models")
        if problems:
            raise SettingsError("invalid settings: " + "; ".join(problems))


_FIELDS = {f.name: f for f in dataclasses.fields(ServerSettings)}


def _coerce(name: str, value: Any) -> Any:
    """YAML / env value -> the field's type (env values are strings)."""
    typ = _FIELDS[name].type
    try:
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            return int(value)
        if typ == "float":
            return float(value)
        if typ == "str":
            return str(value)
        if typ == "tuple[str, ...]":
            if isinstance(value, str):
                return tuple(s.strip() for s in value.split(",") if s.strip())
            if isinstance(value, list | tuple):
                return tuple(str(s) for s in value)
            raise ValueError("expected a list or a comma separated string")
    except (TypeError, ValueError) as e:
        raise SettingsError(f"setting {name}: {value!r} is not a valid {typ} ({e})") from e
    raise AssertionError(f"unhandled settings type {typ}")


def load_settings(
    config: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> ServerSettings:
    """Defaults < YAML file `config` < environment `USEREMBED_*` < keyword overrides."""
    values: dict[str, Any] = {}
    if config:
        try:
            data = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SettingsError(f"settings file {config}: {e}") from e
        if not isinstance(data, dict):
            raise SettingsError(f"settings file {config}: expected a mapping at the top level")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise SettingsError(
                f"settings file {config}: unknown keys {unknown} (known: {sorted(_FIELDS)})"
            )
        values.update({k: _coerce(k, v) for k, v in data.items()})
    env = os.environ if env is None else env
    for name in _FIELDS:
        if (raw := env.get(ENV_PREFIX + name.upper())) is not None:
            values[name] = _coerce(name, raw)
    for name, v in overrides.items():
        if name not in _FIELDS:
            raise SettingsError(f"unknown setting {name!r}")
        if v is not None:
            values[name] = _coerce(name, v) if not isinstance(v, tuple) else v
    return ServerSettings(**values)

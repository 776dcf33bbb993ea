"""The stored path under Zipf traffic: one id per call, user ranks drawn from Zipf(`--zipf`) over
`--zipf-users` users, the server with its vector cache on (the defaults) beside the no-op echo,
the same server with the cache off, and one worker with the cache on; the cache's hit ratio from
the cached server's /metrics (summed over its workers)."""

from __future__ import annotations

import re
import time
import urllib.request
from contextlib import ExitStack
from typing import Any

import numpy as np

from bench.common import log
from bench.serving_data import EV, MODEL, World
from bench.serving_load import median_of, warm_up_calls
from bench.serving_measure import ServingBench, Side

ZIPF_LOAD = ((1, 2000), (16, 6000), (64, 6000))  # (concurrency, calls at --scale 1)
WARM_UP_BATCHES = 2000  # 100 Zipf ids per call: 200,000 lookups warm the workers' caches
_METRICS = re.compile(r"metrics on :(\d+)")


class CachedSide(Side):
    """A server side whose /metrics port is known (the vector cache's counters)."""

    metrics_port: int = 0

    def cache_counts(self) -> tuple[float, float]:
        """(hits, misses) so far, summed over the workers."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        counts = {"hit": 0.0, "miss": 0.0}
        for line in body.splitlines():
            for result in counts:
                if line.startswith(f'userembed_vector_cache_lookups_total{{result="{result}"}}'):
                    counts[result] += float(line.rsplit(" ", 1)[1])
        return counts["hit"], counts["miss"]


def start_cached(stack: ExitStack, name: str, argv: list[str], env: dict[str, str]) -> CachedSide:
    """A server with its metrics endpoint on (any port), stopped when `stack` closes."""
    from userembed import processes

    proc, line = processes.start(argv, {**env, "USEREMBED_METRICS_PORT": "0"}, processes.LISTENING)
    stack.callback(processes.stop, proc)
    side = CachedSide(name, processes.listening_address(line), proc)
    m = _METRICS.search(line)
    if m is None:
        raise RuntimeError(f"{name}: no metrics port in {line!r}")
    side.metrics_port = int(m.group(1))
    return side


def extend_vectors(world: World, total: int, model_version: str) -> None:
    """Stored vectors for users len(world.vectors)..total-1 (copies of the first ones): the
    stored path never reads features, so Zipf traffic over `total` users needs only these."""
    import redis

    from userembed.vectors import VectorStore

    n = len(world.vectors)
    if total <= n:
        return
    t0 = time.perf_counter()
    vs = VectorStore(redis.Redis.from_url(world.url), MODEL)
    for start in range(n, total, 5000):
        ids = list(range(start, min(total, start + 5000)))
        vs.write(EV, [str(u) for u in ids], world.vectors[np.array(ids) % n], model_version)
    log(f"stored {total - n} more vectors for Zipf traffic in {time.perf_counter() - t0:.1f}s")


def zipf_path(
    bench: ServingBench, echo: Side, cached: list[CachedSide], others: list[Side]
) -> None:
    """Every side in turn for `rounds` short runs per concurrency (as the uniform stored path);
    `cached` sides are warmed with Zipf batch calls first and report their hit ratio."""
    a = bench.args
    zipf = {"zipf": a.zipf, "users": a.zipf_users}
    warm = min(WARM_UP_BATCHES, max(10, a.zipf_users // 50))  # a few per user at most
    for c in cached:
        bench.load(c.target, mode="batch", concurrency=8, requests=warm, ids=100,
                   seed=7, **zipf)  # fmt: skip
    sides = [echo, *cached, *others]
    out: dict[str, Any] = {}
    for conc, base in ZIPF_LOAD:
        n = int(base * a.scale) // a.rounds
        procs = a.load_procs if conc > 1 else 1
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
        before = {c.name: c.cache_counts() for c in cached}
        for r in range(a.rounds):
            for side in sides:
                runs[side.name].append(
                    bench.load(side.target, procs, mode="get", concurrency=conc, requests=n,
                               seed=11 + r, **zipf)
                )  # fmt: skip
        bench.calls += a.rounds * (n + warm_up_calls(n))
        med = {name: median_of(r) for name, r in runs.items()}
        echo_req_s = med[echo.name]["req_s"]
        row: dict[str, Any] = {
            "echo_req_s": echo_req_s,
            "echo_runs_req_s": med[echo.name]["runs_req_s"],
        }
        for side in [*cached, *others]:
            m = med[side.name]
            row[side.name] = {
                **{k: m[k] for k in ("req_s", "p50_ms", "p99_ms", "errors", "runs_req_s")},
                "ratio_vs_echo": round(m["req_s"] / echo_req_s, 3),
            }
        for c in cached:
            hits0, misses0 = before[c.name]
            hits, misses = c.cache_counts()
            dh, dm = hits - hits0, misses - misses0
            row[c.name]["hit_ratio"] = round(dh / (dh + dm), 3) if dh + dm else None
        out[str(conc)] = row
        log(f"zipf c={conc}: echo {echo_req_s} req/s; " + "; ".join(
            f"{s.name} {row[s.name]['req_s']} ({row[s.name]['ratio_vs_echo']} of echo"
            + (f", hit ratio {row[s.name].get('hit_ratio')})" if s in cached else ")")
            for s in [*cached, *others]
        ))  # fmt: skip
    bench.result["zipf"] = {"exponent": a.zipf, "users": a.zipf_users, "by_concurrency": out}


def world_model_version(url: str) -> str:
    """The model version that made the stored vectors (their embedding version's record)."""
    import redis

    from userembed.vectors import VectorStore

    info = VectorStore(redis.Redis.from_url(url), MODEL).version_info(EV)
    if info is None:
        raise RuntimeError(f"no embedding version {EV} in {url}")
    return info.model_version


def admission_hit_ratios(
    exponent: float, users: int, requests: int = 400_000, fractions: tuple[float, ...] = (0.01, 0.1)
) -> dict[str, dict[str, float]]:
    """Hit ratios of the server's cache (TinyLFU admission, LRU eviction) beside plain LRU on one
    Zipf trace, with room for `fractions` of the users: what the admission policy buys when the
    hot set does not fit (with room for every user both end at the compulsory misses)."""
    from collections import OrderedDict

    from embed_server.vector_cache import ENTRY_OVERHEAD, VectorCache

    g = np.random.default_rng(5)
    draws = g.zipf(exponent, size=3 * requests)
    trace = (draws[draws <= users] - 1)[:requests].tolist()
    row = [bytes(4 * 64), b"f32", b"v", b"0", b"0"]
    out: dict[str, dict[str, float]] = {}
    for frac in fractions:
        room = int(users * frac)
        cache = VectorCache(room * (len(row[0]) + ENTRY_OVERHEAD))
        lru: OrderedDict[int, None] = OrderedDict()
        hits = lru_hits = 0
        for u in trace:
            if cache.lookup(u) is not None:
                hits += 1
            else:
                cache.fill(u, row, cache.epoch)
            if u in lru:
                lru_hits += 1
                lru.move_to_end(u)
            else:
                lru[u] = None
                if len(lru) > room:
                    lru.popitem(last=False)
        out[f"{frac:g}"] = {
            "tinylfu": round(hits / len(trace), 3),
            "lru": round(lru_hits / len(trace), 3),
        }
    log(f"cache hit ratio on a Zipf({exponent}) trace, room for a fraction of {users} users: {out}")
    return out

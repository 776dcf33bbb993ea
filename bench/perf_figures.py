"""The perf suite's figures: `Figure` (a value beside its reference) and the `*_figures` functions
that read them out of each benchmark script's last-line JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Figure:
    """One measured figure beside its reference; ratio = value / reference (higher = better)."""

    suite: str
    name: str
    value: float | None
    unit: str
    reference: str
    reference_value: float | None

    @property
    def ratio(self) -> float | None:
        if not self.value or not self.reference_value:
            return None
        return round(self.value / self.reference_value, 3)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def _num(d: Any, *keys: str) -> float | None:
    """d[k1][k2]... as float, None when any level is missing (a script changed its output)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, int | float) else None


def serving_figures(r: dict[str, Any], refs: dict[str, Any]) -> list[Figure]:
    out = []
    bench = refs.get("redis_benchmark", {})
    for conc, row in sorted(r.get("stored_path", {}).items(), key=lambda kv: int(kv[0])):
        out.append(
            Figure(
                "serving", f"stored path req/s, concurrency {conc}", _num(row, "req_s"), "req/s",
                "no-op gRPC echo server", _num(row, "echo_req_s"),
            )
        )  # fmt: skip
        if "echo_redis_req_s" in row:
            out.append(
                Figure(
                    "serving", f"stored path req/s, concurrency {conc}", _num(row, "req_s"),
                    "req/s", "echo + one HMGET of the vector", _num(row, "echo_redis_req_s"),
                )
            )  # fmt: skip
        if "one_worker_req_s" in row:
            out.append(
                Figure(
                    "serving", f"stored path req/s, 1 worker, concurrency {conc}",
                    _num(row, "one_worker_req_s"), "req/s", "no-op gRPC echo server",
                    _num(row, "echo_req_s"),
                )
            )  # fmt: skip
        if str(conc) in bench:
            out.append(
                Figure(
                    "serving", f"stored path req/s, concurrency {conc}", _num(row, "req_s"),
                    "req/s", "redis-benchmark GET -d 256", float(bench[str(conc)]),
                )
            )  # fmt: skip
    b = r.get("batch_100", {})
    if b:
        out.append(
            Figure(
                "serving", "batch path users/s (100 per call)", _num(b, "users_s"), "users/s",
                "raw redis-py MGET", _num(b, "raw_mget_users_s"),
            )
        )  # fmt: skip
    if "one_worker" in b:
        out.append(
            Figure(
                "serving", "batch path users/s (100 per call), 1 worker",
                _num(b, "one_worker", "users_s"), "users/s", "raw redis-py MGET",
                _num(b, "raw_mget_users_s"),
            )
        )  # fmt: skip
    m = r.get("miss_path", {})
    if "one_worker" in m:
        out.append(
            Figure(
                "serving", "miss path users/s, 1 worker", _num(m, "one_worker", "users_s"),
                "users/s", "raw onnxruntime, same batch", _num(m, "raw_onnxruntime_users_s"),
            )
        )  # fmt: skip
    z = r.get("zipf", {})
    for conc, row in sorted(z.get("by_concurrency", {}).items(), key=lambda kv: int(kv[0])):
        for side, label in (("cached", "vector cache on"),
                            ("cached_one_worker", "vector cache on, 1 worker"),
                            ("server", "vector cache off")):  # fmt: skip
            if side not in row:
                continue
            hit = row[side].get("hit_ratio")
            out.append(
                Figure(
                    "serving",
                    f"Zipf({z['exponent']}) over {z['users']:,} users, {label}, concurrency "
                    f"{conc}" + (f" (hit ratio {hit})" if hit is not None else ""),
                    _num(row, side, "req_s"), "req/s", "no-op gRPC echo server",
                    _num(row, "echo_req_s"),
                )
            )  # fmt: skip
    if m:
        out.append(
            Figure(
                "serving", "miss path users/s (online features + encoder)", _num(m, "users_s"),
                "users/s", "raw onnxruntime, same batch", _num(m, "raw_onnxruntime_users_s"),
            )
        )  # fmt: skip
        out.append(
            Figure(
                "serving", "miss path users/s, 64 ids per call", _num(m, "batch_of_64", "users_s"),
                "users/s", "raw onnxruntime, same batch", _num(m, "raw_onnxruntime_users_s"),
            )
        )  # fmt: skip
    for conc, row in r.get("feast_serve", {}).items():
        out.append(
            Figure(
                "serving", f"stored path req/s vs feast serve, concurrency {conc}",
                _num(row, "server_req_s"), "req/s", "feast serve (HTTP, 1 worker)",
                _num(row, "server_req_s") / row["server_speedup"]
                if _num(row, "server_req_s") and row.get("server_speedup") else None,
            )
        )  # fmt: skip
        if row.get("zipf_cached_speedup"):
            out.append(
                Figure(
                    "serving", f"Zipf stored path, vector cache on, vs feast serve, concurrency "
                    f"{conc}", _num(row, "zipf_cached_req_s"), "req/s",
                    "feast serve (HTTP, 1 worker)",
                    _num(row, "zipf_cached_req_s") / row["zipf_cached_speedup"],
                )
            )  # fmt: skip
    return out


def refresh_figures(r: dict[str, Any], refs: dict[str, Any]) -> list[Figure]:
    return [
        Figure(
            "refresh", f"refresh users/s ({r.get('users')} users)", _num(r, "refresh_users_per_s"),
            "users/s", "raw onnxruntime on pre-encoded inputs", _num(r, "raw_ort_users_per_s"),
        )
    ]  # fmt: skip


def encoder_figures(r: dict[str, Any], refs: dict[str, Any]) -> list[Figure]:
    return [
        Figure(
            "encoder", f"onnxruntime users/s, batch {row.get('batch')}",
            _num(row, "ort_users_per_s"), "users/s", "PyTorch eager, same model",
            _num(row, "torch_users_per_s"),
        )
        for row in r.get("results", [])
    ]  # fmt: skip


def data_figures(r: dict[str, Any], refs: dict[str, Any]) -> list[Figure]:
    """bench/data_gen.py: generation + point-in-time tables; no external reference exists, so
    the figures stand alone (events/s and peak memory)."""
    out = []
    events, total = _num(r, "events"), _num(r, "total_s")
    if events and total:
        out.append(
            Figure(
                "data", f"synthetic events/s to feature tables ({r.get('users')} users)",
                events / total, "events/s", "-", None,
            )
        )  # fmt: skip
    if _num(r, "peak_rss_gib") is not None:
        out.append(Figure("data", "peak RSS", _num(r, "peak_rss_gib"), "GiB", "-", None))
    return out


def training_figures(r: dict[str, Any], refs: dict[str, Any]) -> list[Figure]:
    """bench/train_speed.py: world size 2 vs 1, 16 vs 4 experts (same top-k and width)."""
    ws1, ws2, e16 = r.get("ws1", {}), r.get("ws2", {}), r.get("experts16", {})
    return [
        Figure(
            "training", "train samples/s, world size 2 (torchrun, gloo)",
            _num(ws2, "samples_per_s"), "samples/s", "world size 1", _num(ws1, "samples_per_s"),
        ),
        Figure(
            "training", "train samples/s, 16 experts top-2", _num(e16, "samples_per_s"),
            "samples/s", "4 experts top-2", _num(ws1, "samples_per_s"),
        ),
    ]  # fmt: skip


def moe_scaling_figures(r: dict[str, Any], refs: dict[str, Any]) -> list[Figure]:
    """perf.py --role train-speed: dense transformer (reference) vs top-2 MoE, 2/4/8 experts."""
    rows = r.get("rows", [])
    dense = next((x for x in rows if x.get("name") == "dense"), None)
    ref = _num(dense, "samples_per_s") if dense else None
    return [
        Figure(
            "moe_scaling", f"train samples/s, {x['name']} ({x['dense_params']:,} dense params)",
            _num(x, "samples_per_s"), "samples/s",
            f"dense transformer, same active FFN ({dense['dense_params']:,} params)"
            if dense else "dense transformer", ref,
        )
        for x in rows
        if x.get("name") != "dense"
    ]  # fmt: skip

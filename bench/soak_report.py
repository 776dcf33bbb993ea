"""The soak benchmark's figures: calls and latency per time window, each fault beside the errors
that followed it, the errors no fault explains, and the printed tables."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from bench.soak_chaos import REDIS_RESTART, Fault
from bench.soak_traffic import CODE_NAMES, KINDS, OK, Calls

# Statuses a caller retries: what a Redis restart may cause. Any other error, or one of these
# outside a restart's window (kill .. up again + RECOVERY_GRACE_S), is unexplained.
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
RECOVERY_GRACE_S = 5.0


def _p(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 2) if len(values) else None


def _codes(codes: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(codes, return_counts=True)
    return {CODE_NAMES[int(c)]: int(n) for c, n in zip(values, counts, strict=True)}


def arrays(calls: Calls) -> dict[str, np.ndarray]:
    return {
        "t": np.asarray(calls.t, dtype=np.float64),
        "latency": np.asarray(calls.latency, dtype=np.float64),
        "kind": np.asarray(KINDS)[np.asarray(calls.kind, dtype=np.int64)],
        "code": np.asarray(calls.code, dtype=np.int64),
        "item_t": np.asarray(calls.item_t, dtype=np.float64),
        "item_code": np.asarray(calls.item_code, dtype=np.int64),
    }


def windows(
    a: dict[str, np.ndarray], window_s: float, end_s: float, rss: list[tuple[float, int]]
) -> list[dict[str, Any]]:
    """Per window: calls, errors by status, p50/p99 of successful calls (all, and per kind),
    the server's RSS at the window's last sample."""
    rows = []
    n = max(1, round(end_s / window_s))  # the last window takes the calls still in flight
    for i in range(n):
        start, stop = i * window_s, (i + 1) * window_s if i + 1 < n else end_s + 1.0
        sel = (a["t"] >= start) & (a["t"] < stop)
        ok = sel & (a["code"] == OK)
        row: dict[str, Any] = {
            "start_s": round(start, 1),
            "calls": int(sel.sum()),
            "errors": _codes(a["code"][sel & (a["code"] != OK)]),
            "p50_ms": _p(a["latency"][ok], 50),
            "p99_ms": _p(a["latency"][ok], 99),
        }
        for kind in KINDS:
            row[f"p99_{kind}_ms"] = _p(a["latency"][ok & (a["kind"] == kind)], 99)
        samples = [b for t, b in rss if t < stop]
        row["rss_mib"] = round(samples[-1] / 2**20, 1) if samples else None
        rows.append(row)
    return rows


def timeline(faults: list[Fault], a: dict[str, np.ndarray], end_s: float) -> list[dict[str, Any]]:
    """Each fault with the calls and errors from its start to the next fault's start: errors by
    status, the first and last error (seconds after the fault started) and when calls succeeded
    again after the last one."""
    rows = []
    starts = [f.started_s if f.started_s is not None else f.at_s for f in faults]
    for i, f in enumerate(faults):
        start, stop = starts[i], starts[i + 1] if i + 1 < len(faults) else end_s
        sel = (a["t"] >= start) & (a["t"] < stop)
        err = sel & (a["code"] != OK)
        item_err = (a["item_t"] >= start) & (a["item_t"] < stop)
        row: dict[str, Any] = {
            "kind": f.kind,
            "at_s": round(start, 1),
            "observed": f.observed,
            "detail": f.detail,
            "calls": int(sel.sum()),
            "errors": _codes(a["code"][err]),
            "item_errors": _codes(a["item_code"][item_err]),
            **f.data,
        }
        if err.any():
            last = float(a["t"][err].max())
            row["first_error_s"] = round(float(a["t"][err].min()) - start, 2)
            row["last_error_s"] = round(last - start, 2)
            after = sel & (a["code"] == OK) & (a["t"] > last)
            row["ok_again_s"] = (
                round(float(a["t"][after].min()) - start, 2) if after.any() else None
            )
        rows.append(row)
    return rows


def unexplained(faults: list[Fault], a: dict[str, np.ndarray]) -> dict[str, Any]:
    """Errors (calls and batch items) that are not retryable or fall outside every Redis
    restart's window."""
    spans = [
        (f.started_s, (f.ended_s or f.started_s) + RECOVERY_GRACE_S)
        for f in faults
        if f.kind == REDIS_RESTART and f.started_s is not None
    ]
    found: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for t_key, c_key in (("t", "code"), ("item_t", "item_code")):
        for t, code in zip(a[t_key], a[c_key], strict=True):
            name = CODE_NAMES[int(code)]
            if code == OK or (name in RETRYABLE and any(s <= t <= e for s, e in spans)):
                continue
            found[name] += 1
            if len(examples) < 10:
                examples.append({"t": round(float(t), 2), "code": name, "item": t_key != "t"})
    return {"count": sum(found.values()), "by_code": dict(found), "examples": examples}


def totals(a: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "requests": len(a["t"]),
        "ok": int((a["code"] == OK).sum()),
        "by_kind": {k: int((a["kind"] == k).sum()) for k in KINDS},
        "errors_by_code": _codes(a["code"][a["code"] != OK]),
        "item_errors_by_code": _codes(a["item_code"]),
        "p99_ms": _p(a["latency"][a["code"] == OK], 99),
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _errs(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


def print_tables(report: dict[str, Any]) -> None:
    t = report["totals"]
    print(
        f"soak: {report['seconds']:.0f}s, {report['users']} users, {report['concurrency']} "
        f"callers: {t['requests']} calls ({t['ok']} ok; "
        + ", ".join(f"{k} {v}" for k, v in t["by_kind"].items())
        + f"), {report['vectors_checked']} vectors checked, {report['wrong_vectors']} wrong"
    )
    print(f"errors by status: calls {_errs(t['errors_by_code'])}; "
          f"batch items {_errs(t['item_errors_by_code'])}; "
          f"unexplained {report['unexplained_errors']['count']}")  # fmt: skip
    print(f"server RSS: {report['rss_mib']['start']} MiB at the start, "
          f"{report['rss_mib']['end']} MiB at the end")  # fmt: skip
    print()
    print(f"{'window':>8} {'calls':>7} {'p50 ms':>7} {'p99 ms':>7} {'stored':>7} {'miss':>7} "
          f"{'batch':>7} {'RSS MiB':>8}  errors")  # fmt: skip
    for w in report["windows"]:
        print(
            f"{w['start_s']:>7.0f}s {w['calls']:>7} {_ms(w['p50_ms']):>7} {_ms(w['p99_ms']):>7} "
            f"{_ms(w['p99_stored_ms']):>7} {_ms(w['p99_miss_ms']):>7} "
            f"{_ms(w['p99_batch_ms']):>7} {w['rss_mib'] or '-':>8}  {_errs(w['errors'])}"
        )
    print()
    print(f"{'at':>7}  {'fault':<14} {'calls':>6}  errors until the next fault / effect")
    for f in report["timeline"]:
        err = _errs(f["errors"])
        if f["errors"]:
            err += (f" (first {f['first_error_s']}s, last {f['last_error_s']}s after it; "
                    f"ok again at {f['ok_again_s']}s)")  # fmt: skip
        if f["item_errors"]:
            err += f"; batch items {_errs(f['item_errors'])}"
        mark = "" if f["observed"] else "  [NOT OBSERVED]"
        print(f"{f['at_s']:>6.1f}s  {f['kind']:<14} {f['calls']:>6}  {err}")
        print(f"{'':>24}{f['detail']}{mark}")
    for w in report["wrong"]:
        print(f"WRONG VECTOR: {w}")


BEGIN = "<!-- soak:begin (generated by bench/soak.py --write-md; edits here are replaced) -->"
END = "<!-- soak:end -->"


def markdown(report: dict[str, Any]) -> str:
    """The soak section of BENCHMARKS.md (between BEGIN and END)."""
    t = report["totals"]
    kinds = ", ".join(f"{k} {v:,}" for k, v in t["by_kind"].items())
    lines = [
        BEGIN,
        "",
        f"Generated {report['generated']} by `{report.get('command', 'bench/soak.py')}`: "
        f"{report['seconds']:.0f} s, {report['users']:,} users, {report['concurrency']} "
        f"closed-loop callers, {report['server_processes']} server process(es); load average "
        f"at the end {report['load_avg_1m']} on {report['cpus']} cores (shared machine).",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| calls served | {t['requests']:,} ({t['ok']:,} ok; {kinds}) |",
        f"| vectors checked / wrong | {report['vectors_checked']:,} / "
        f"**{report['wrong_vectors']}** |",
        f"| errors by status (calls; batch items) | {_errs(t['errors_by_code'])}; "
        f"{_errs(t['item_errors_by_code'])} |",
        f"| errors no fault explains | {report['unexplained_errors']['count']} |",
        f"| server RSS start / end | {report['rss_mib']['start']} / {report['rss_mib']['end']} "
        "MiB |",
        f"| SERVING at the end | {'yes' if report['serving_at_end'] else 'NO'} |",
        "",
        f"Per {report['window_s']:.0f} s (p50 / p99 of successful calls, ms; RSS of the server's "
        "processes at the window's end):",
        "",
        "| from | calls | p50 | p99 | p99 stored | p99 miss | p99 batch | RSS MiB | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in report["windows"]:
        lines.append(
            f"| {w['start_s']:.0f} s | {w['calls']:,} | {_ms(w['p50_ms'])} | {_ms(w['p99_ms'])} "
            f"| {_ms(w['p99_stored_ms'])} | {_ms(w['p99_miss_ms'])} | {_ms(w['p99_batch_ms'])} "
            f"| {w['rss_mib']} | {_errs(w['errors'])} |"
        )
    lines += [
        "",
        "Faults (errors counted until the next fault):",
        "",
        "| at | fault | what happened | calls | errors | ok again |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in report["timeline"]:
        ok_again = f"{f['ok_again_s']} s after" if f.get("ok_again_s") is not None else "-"
        mark = "" if f["observed"] else " **(not observed)**"
        lines.append(
            f"| {f['at_s']:.0f} s | {f['kind']} | {f['detail']}{mark} | {f['calls']:,} "
            f"| {_errs(f['errors'])} | {ok_again} |"
        )
    lines += ["", END]
    return "\n".join(lines)

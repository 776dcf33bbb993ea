"""Load time of each page of `userembed ui` for a registry of 20 versions and 100,000 users.

    .venv/bin/python -m tests.ui.load_time --redis-url redis://127.0.0.1:6399/0 [--users N]

Builds the demo's kind of data at that size (tests/ui/demo.py: 20 published versions of the
tiny encoder, two real refreshes of every user into the given Redis, which it empties first),
starts `userembed ui` (and waits --settle-s), then fetches each page and every image on it: once cold (plots drawn,
nothing cached) and three times warm, printing the seconds. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

from refresh.job import refresh
from tests.refresh.support import offline_tables, refresh_config, write_offline
from tests.tiny_model import MODEL
from tests.ui import demo
from userembed.registry import Registry


def fetch(url: str) -> tuple[float, float, int]:
    """Seconds to get the page, then with each image on it fetched one after the other;
    bytes fetched."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as r:
        body = r.read()
    html_s = time.perf_counter() - t0
    size = len(body)
    base = url.split("/", 3)[:3]
    for src in re.findall(r'<img src="([^"]+)"', body.decode()):
        with urllib.request.urlopen("/".join(base) + src.replace("&amp;", "&"), timeout=300) as r:
            size += len(r.read())
    return html_s, time.perf_counter() - t0, size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--settle-s", type=float, default=5.0, help="wait after the start")
    args = ap.parse_args()
    redis.Redis.from_url(args.redis_url).flushdb()
    root = Path(tempfile.mkdtemp(prefix="ui-load-"))
    t0 = time.perf_counter()
    registry = Registry(root / "models")
    offline = write_offline(root / "offline", *offline_tables(args.users, seed=1), 50_000)
    cfg = refresh_config(registry, args.redis_url, offline, part_rows=50_000, drift_sample=1000)
    for seed in range(args.versions):
        demo.publish(registry, root / "staging", seed)
        if seed >= args.versions - 2:  # the last two versions: one refresh each (drift)
            refresh(cfg)
    demo.transfer_report(root / "transfer")
    print(f"built in {time.perf_counter() - t0:.1f}s: {args.versions} versions, {args.users} users")

    env = os.environ | {
        "USEREMBED_HOME": str(root / "home"),
        "REDIS_URL": args.redis_url,
        "USEREMBED_REGISTRY_ROOT": registry.root,
        "USEREMBED_OFFLINE_DIR": str(offline),
    }
    argv = [sys.executable, "-m", "userembed.commands", "ui", "--port", "0", "--no-recompute",
            "--transfer-dir", str(root / "transfer")]  # fmt: skip
    ui = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert ui.stdout is not None
        url = re.search(r"http://\S+/", ui.stdout.readline())
        assert url
        base = url.group(0).rstrip("/")
        v = registry.list_versions(MODEL)[-1]
        pages = ["/", f"/model?name={MODEL}", f"/version?model={MODEL}&version={v}", "/transfer",
                 f"/user?model={MODEL}&id=4242", f"/projection?model={MODEL}&attribute=age_bucket",
                 f"/status?model={MODEL}"]  # fmt: skip
        time.sleep(args.settle_s)  # the server draws a first figure on start (plots.warm_up)
        print(f"{'page':52} {'cold html':>9} {'cold all':>9} {'warm all (median of 3)':>23} KiB")
        for page in pages:
            html_s, cold, size = fetch(base + page)
            warm = statistics.median(fetch(base + page)[1] for _ in range(3))
            print(f"{page:52} {html_s:9.3f} {cold:9.3f} {warm:23.3f} {size / 1024:4.0f}")
    finally:
        ui.terminate()
        ui.wait(timeout=10)


if __name__ == "__main__":
    main()

"""`userembed ui` in a real browser: headless Chromium (Debian's package, installed by
deploy/native/setup.sh) opens every page of a running instance over demo data (tests/ui/demo.py:
a real registry, four real refreshes, a real gRPC server for the recompute) and the test reads
what a person would see in the rendered DOM. Screenshots of each page go to /tmp/ui_shots/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embed_server.server import EmbeddingServer
from embed_server.settings import load_settings
from tests.conftest import RedisServer
from tests.embed_server.conftest import FakeFeatures, LoopThread
from tests.refresh.support import latest_rows_python
from tests.tiny_model import MODEL
from tests.ui import demo
from userembed.snapshots import BEHAVIOR_FILE, PROFILE_FILE

pytestmark = pytest.mark.timeout(240)

SHOTS = Path(os.environ.get("UI_SHOTS_DIR", "/tmp/ui_shots"))
PASSWORD = "s3cret-ui-pw"
USER = "5"


@dataclass(frozen=True)
class Instance:
    url: str
    demo: demo.Demo
    redis_url: str


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:  # CI installs it (deploy/native/setup.sh): a missing browser is a failure
        pytest.fail("no chromium on PATH: run deploy/native/setup.sh (apt-get install chromium)")
    return found


def _browser(url: str, profile: Path, *action: str) -> str:
    argv = [
        _chromium(),
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *action,
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _features(offline_dir: str) -> FakeFeatures:
    """The server's online features = the offline tables' newest rows, as a materialisation
    would leave them: a recompute then equals what the refresh stored."""
    latest = latest_rows_python(pq.read_table(Path(offline_dir) / BEHAVIOR_FILE))
    profile = pq.read_table(Path(offline_dir) / PROFILE_FILE).to_pylist()
    ages = {r["user_id"]: r["age_bucket"] for r in profile}
    f = FakeFeatures()
    for uid, row in latest.items():
        f.users[str(uid)] = {
            "item_seq": row["item_seq"],
            "category_seq": row["category_seq"],
            "age_bucket": ages[uid],
            "_ts": int(row["event_timestamp"].timestamp() * 1000),
        }
    return f


@pytest.fixture(scope="module")
def instance(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Instance]:
    root = tmp_path_factory.mktemp("ui")
    if redis_server.proc is None:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    # A Redis user with a password: the page must never show it.
    client.execute_command("ACL", "SETUSER", "uitest", "on", f">{PASSWORD}", "~*", "&*", "+@all")
    redis_url = f"redis://uitest:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    built = demo.build(root, redis_url)

    loop = LoopThread()
    settings = load_settings(
        env={},
        grpc_port=0,
        metrics_port=0,
        registry_root=built.registry_root,
        redis_url=redis_url,
        reload_interval_s=60.0,
        batch_wait_ms=1.0,
        drain_grace_s=0.5,
    )
    grpc_server = EmbeddingServer(settings, features=_features(built.offline_dir))
    loop.run(grpc_server.start())

    env = os.environ | {
        "USEREMBED_HOME": str(root / "home"),
        "REDIS_URL": redis_url,
        "USEREMBED_REGISTRY_ROOT": built.registry_root,
        "USEREMBED_OFFLINE_DIR": built.offline_dir,
    }
    argv = [sys.executable, "-m", "userembed.commands", "ui", "--port", "0",
            "--transfer-dir", built.transfer_dir, "--target", f"127.0.0.1:{grpc_server.port}"]  # fmt: skip
    ui = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert ui.stdout is not None
        line = ui.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, f"ui did not start: {line}{ui.stdout.read() if ui.poll() is not None else ''}"
        assert PASSWORD not in line
        yield Instance(f"http://127.0.0.1:{match.group(1)}", built, redis_url)
    finally:
        ui.terminate()
        ui.wait(timeout=10)
        loop.run(grpc_server.stop(grace=0.5))
        loop.close()
        client.execute_command("ACL", "DELUSER", "uitest")


@dataclass(frozen=True)
class Page:
    name: str
    path: str
    title: str
    texts: tuple[str, ...]
    plots: tuple[str, ...] = ()


def _pages(inst: Instance) -> list[Page]:
    v1, v2 = inst.demo.model_versions
    ev = inst.demo.embedding_versions
    return [
        Page("models", "/", "Models", (MODEL, "latest=" + v2, ev[-1], "feast -c feature_repo ui")),
        Page(
            "model",
            f"/model?name={MODEL}",
            f"Model {MODEL}",
            (
                "Registry versions",
                v1,
                v2,
                "click=0.6650",
                "1.50e-07",
                f"Readers follow {ev[-1]}",
                "300 computed, 0 copied, 0 non-finite",
                "knn_overlap=",
                "mean_cosine=1.0",
            ),  # fmt: skip
            ("/plot/drift.png", "/plot/auc.png", "/plot/expert_load.png"),
        ),
        Page(
            "version",
            f"/version?model={MODEL}&version={v1}",
            f"{MODEL} {v1}",
            ("Export parity", "fp32 / heldout / user_vector_max_abs_diff", "purchase", "0.6700"),
            ("/plot/auc.png", "/plot/expert_load.png"),
        ),
        Page(
            "transfer",
            "/transfer",
            "Transfer",
            ("synthetic", "profile", "activity", "0.850 ± 0.002"),
        ),
        Page(
            "user",
            f"/user?model={MODEL}&id={USER}&recompute=1",
            "User",
            (
                f"user {USER} of {MODEL}",
                f"stored vector: found in {ev[-1]}",
                "cosine(stored, recomputed) = ",
                "stored (Redis)",
                "computed",
            ),  # fmt: skip
        ),
        Page(
            "user_unknown",
            f"/user?model={MODEL}&id=99999&recompute=1",
            "User",
            ("stored vector: none", "recompute: NOT_FOUND from", "unknown user '99999'"),
        ),
        Page(
            "projection",
            f"/projection?model={MODEL}&attribute=age_bucket",
            "Projection",
            (f"Version readers follow: {ev[-1]}",),
            ("/plot/projection.png",),
        ),
        Page("status", f"/status?model={MODEL}", "Status", ("registry", "embeddings", "redis")),
    ]


@pytest.fixture(scope="module")
def rendered(instance: Instance, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each page's DOM as Chromium rendered it, and a screenshot of it, from one launch per
    page (launches run side by side: a launch mostly waits)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    profiles = tmp_path_factory.mktemp("chromium")
    pages = _pages(instance)

    def visit(p: Page) -> str:
        shot = SHOTS / f"{p.name}.png"
        shot.unlink(missing_ok=True)
        return _browser(instance.url + p.path, profiles / p.name, "--dump-dom",
                        "--window-size=1200,1400", f"--screenshot={shot}")  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        doms = dict(zip([p.name for p in pages], pool.map(visit, pages), strict=True))
    return doms


def test_every_page_shows_its_title_figures_and_plots(instance: Instance, rendered: dict[str, str]):
    for page in _pages(instance):
        dom = rendered[page.name]
        assert f"<title>{page.title} - userembed</title>" in dom, page.name
        assert f"<h1>{page.title}</h1>" in dom, page.name
        text = re.sub(r"<[^>]+>", "", dom).replace("&amp;", "&")
        for wanted in page.texts:
            assert wanted in text or wanted in dom, f"{page.name}: {wanted!r} not shown"
        srcs = re.findall(r'<img src="([^"]+)"', dom)
        for plot in page.plots:
            src = next((s for s in srcs if s.startswith(plot)), None)
            assert src, f"{page.name}: no {plot} image"
            with urllib.request.urlopen(instance.url + src.replace("&amp;", "&"), timeout=60) as r:
                body = r.read()
            assert r.status == 200 and body.startswith(b"\x89PNG") and len(body) > 5000, src
        shot = SHOTS / f"{page.name}.png"
        assert shot.is_file() and shot.stat().st_size > 10_000, f"no screenshot of {page.name}"


def test_no_secret_and_nothing_fetched_from_outside(rendered: dict[str, str]):
    for name, dom in rendered.items():
        assert PASSWORD not in dom, name
        assert "<script" not in dom, name
        assert not re.findall(r'(?:src|href|action)="(?:https?:)?//', dom), name
    assert "uitest:***@127.0.0.1" in rendered["models"]


def test_the_recompute_agrees_with_the_stored_vector(rendered: dict[str, str]):
    cosine = re.search(r"cosine\(stored, recomputed\) = <b>([0-9.]+)</b>", rendered["user"])
    assert cosine and float(cosine.group(1)) > 0.9999


def test_a_wrong_user_id_is_one_clear_answer(instance: Instance, tmp_path: Path):
    dom = _browser(instance.url + f"/user?model={MODEL}&id=042", tmp_path, "--dump-dom")
    assert "<h1>Bad request</h1>" in dom and "not a canonical decimal integer" in dom

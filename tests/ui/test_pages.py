"""The web page's parts without a browser: what it answers before anything exists, the transfer
results of the repository read as data, the projection's PCA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from userembed.commands.ui import TRANSFER_DIR, refresh_record
from userembed.ui.data import UiConfig, UiSources, transfer_tables
from userembed.ui.projection import pca_2d
from userembed.ui.server import UiApp


def app(tmp_path: Path, redis_url: str) -> UiApp:
    config = UiConfig(
        redis_url=redis_url,
        registry_root=str(tmp_path / "models"),
        offline_dir=str(tmp_path / "offline"),
        transfer_dir=str(tmp_path / "transfer"),
        target="127.0.0.1:1",
        report_file="report.json",
    )
    return UiApp(config, UiSources(refresh_record=refresh_record))


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/", 200, "no model in registry"),
        ("/model", 404, "run &#x27;userembed export --run RUN_DIR&#x27; first"),
        ("/transfer", 200, "no transfer benchmark in"),
        ("/projection?model=m", 200, "run &#x27;userembed data build&#x27; first"),
        ("/user?model=m&id=%2B42", 400, "not a canonical decimal integer"),
        ("/version?model=m&version=..%2Fx", 400, "is not a registry version id"),
        ("/model?name=a%7Bb", 400, "must match"),
        ("/nowhere", 404, "Not found"),
    ],
)
def test_before_anything_exists_each_page_says_what_to_run(
    tmp_path: Path, redis_url: str, path: str, status: int, says: str
) -> None:
    got_status, ctype, body = app(tmp_path, redis_url).handle(path)
    assert (got_status, ctype) == (status, "text/html; charset=utf-8")
    assert says in body.decode()


def test_redis_down_is_one_line_without_the_password(tmp_path: Path) -> None:
    from tests.conftest import free_port

    url = f"redis://app:topsecret@127.0.0.1:{free_port()}/0"
    (tmp_path / "models" / "m" / "20260101T000000Z-abcdef").mkdir(parents=True)
    status, _, body = app(tmp_path, url).handle("/user?model=m&id=1")
    assert status == 503 and b"Redis does not answer at redis://app:***@" in body
    assert b"topsecret" not in body


def test_the_repositorys_transfer_results_read_as_tables() -> None:
    files = sorted(Path(TRANSFER_DIR).glob("*.json"))
    assert files, f"no transfer results in {TRANSFER_DIR}"
    tables = transfer_tables(TRANSFER_DIR)
    assert {t.source for t in tables} == {f.stem.removeprefix("transfer_") for f in files}
    for t in tables:
        reps = [rep for rep, _ in t.rows]
        assert "profile" in reps and t.tasks[-1] == "mean"
        assert all(len(cells) == len(t.tasks) for _, cells in t.rows)


def test_pca_keeps_the_direction_of_largest_spread() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * np.array([10, 3, 1, 1, 1, 1, 1, 1])
    points, (first, second) = pca_2d(x)
    assert points.shape == (500, 2) and first > second > 0
    # PC1 is (up to sign) the first axis: its coordinates are the centred first column.
    corr = np.corrcoef(points[:, 0], x[:, 0])[0, 1]
    assert abs(corr) > 0.99


def test_the_status_page_shows_a_down_redis_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import free_port
    from userembed.status import ServerProbe, gather

    url = f"redis://app:topsecret@127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    ui = app(tmp_path, url)
    ui.sources = UiSources(refresh_record, status=lambda m: gather([], ServerProbe("x", None), m))
    status, _, body = ui.handle("/status?model=m")
    assert status == 200 and b"no answer at redis://app:***@127.0.0.1" in body
    assert b"topsecret" not in body

"""bench/compat.py on a tiny made-up folder of saved vectors: it runs, its last line is one JSON
object, and a rotated copy of the old space is recovered by the maps but not fed raw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.compat import main
from bench.transfer_data import ProbeData, save_probe_inputs, vectors_path
from tests.output import last_json


def test_compat_bench_keeps_the_auc_a_rotation_loses(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    n, d = 150, 6
    old = rng.normal(size=(n, d)).astype(np.float32)
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)
    new = old @ rotation + 0.01 * rng.normal(size=(n, d)).astype(np.float32)
    targets = {"a": (old[:, 0] + old[:, 1] > 0).astype(np.float64)}
    save_probe_inputs(tmp_path, ProbeData(np.arange(n), targets, {"a": ""}, np.zeros((n, 0)), ()))
    np.save(vectors_path(tmp_path, "supermoe", 0), old)
    np.save(vectors_path(tmp_path, "supermoe", 1), new)

    assert main(["--vectors", str(tmp_path), "--folds", "3", "--out", str(tmp_path)]) == 0
    last = last_json(capsys.readouterr().out)
    assert last["pairs"] == 2
    kept = {rep: v["mean"] for rep, v in last["kept"].items()}
    assert kept["new_procrustes"] == pytest.approx(1.0, abs=0.05)
    assert kept["new_lstsq"] == pytest.approx(1.0, abs=0.05)
    assert kept["new_raw"] < 0.8
    assert (tmp_path / "compat_movielens.json").exists()

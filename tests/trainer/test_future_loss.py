"""The self-supervised objective: point-in-time future targets, the in-batch softmax loss, a
toy that learns from it alone, and a labels file without task columns through the whole path
(data build -> Feast -> train -> export)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.output import last_json
from tests.trainer.frames import tiny_frame
from trainer.batches import build_input_spec, task_names_of
from trainer.config import ModelConfig, MoEConfig, TrainConfig
from trainer.future_loss import FUTURE_KINDS, encode_future, future_kjt, in_batch_loss
from trainer.train import train
from userembed.datasets import generate_synthetic
from userembed.errors import InvalidInputError
from userembed.features import InputSpec, hash_ids
from userembed.future_targets import (
    FUTURE_CATEGORIES,
    FUTURE_ITEMS,
    FUTURE_OFFSETS,
    future_targets,
)

CUT = pd.Timestamp("2026-03-01", tz="UTC")
DAY = 86_400


def _events(rows: list[tuple[int, int, pd.Timestamp]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [u for u, _, _ in rows],
            "item_id": [i for _, i, _ in rows],
            "category_id": [i // 10 for _, i, _ in rows],
            "event_type": 0,
            "event_timestamp": [t for _, _, t in rows],
        }
    )


def test_targets_are_strictly_after_the_cut_and_inside_the_window() -> None:
    s = pd.Timedelta(seconds=1)
    events = _events(
        [
            (1, 10, CUT - s),  # before the cut: a feature, never a target
            (1, 11, CUT),  # at the cut: neither
            (1, 12, CUT + s),
            (1, 23, CUT + pd.Timedelta(days=3)),
            (1, 34, CUT + pd.Timedelta(days=7)),  # the window's last second
            (1, 45, CUT + pd.Timedelta(days=7) + s),  # past the window
            (3, 50, CUT - pd.Timedelta(days=1)),  # history only
        ]
        # user 2: ten events after its cut, more than the cap of 4
        + [(2, 60 + k, CUT + pd.Timedelta(hours=k + 1)) for k in range(10)]
    ).sample(frac=1.0, random_state=0)  # any order: the builder sorts
    labels = pd.DataFrame(
        {
            "user_id": [1, 2, 3, 4, 1],
            "label_timestamp": [CUT, CUT, CUT, CUT, CUT + pd.Timedelta(days=3)],
        },
        index=[7, 8, 9, 10, 11],
    )
    out = future_targets(events, labels, window_seconds=7 * DAY, max_events=4)
    assert list(out.index) == [7, 8, 9, 10, 11]
    assert list(out.loc[7, FUTURE_ITEMS]) == [12, 23, 34]
    assert list(out.loc[7, FUTURE_CATEGORIES]) == [1, 2, 3]
    assert list(out.loc[7, FUTURE_OFFSETS]) == [1, 3 * DAY, 7 * DAY]
    # evenly spaced over all ten: k * 10 // 4 for k = 0..3
    assert list(out.loc[8, FUTURE_ITEMS]) == [60, 62, 65, 67]
    assert list(out.loc[9, FUTURE_ITEMS]) == [] and list(out.loc[10, FUTURE_ITEMS]) == []
    # the later cut of user 1: the event at that cut is not a target, the one past the first
    # window now is
    assert list(out.loc[11, FUTURE_ITEMS]) == [34, 45]


def test_built_targets_match_the_raw_events_of_every_row() -> None:
    events, _, labels, spec = generate_synthetic(150, seed=3)
    window = int(spec.label_horizon_seconds or 0)
    out = future_targets(events, labels, window)
    ts = pd.to_datetime(events["event_timestamp"], utc=True)
    by_user = {u: g for u, g in events.assign(ts=ts).groupby("user_id")}
    rows_with = 0
    for i, row in labels.iterrows():
        mine = by_user.get(row["user_id"])
        t = row["label_timestamp"]
        if mine is None:
            assert len(out.loc[i, FUTURE_ITEMS]) == 0
            continue
        inside = mine[(mine["ts"] > t) & (mine["ts"] <= t + pd.Timedelta(seconds=window))]
        inside = inside.sort_values("ts", kind="stable")
        got = list(out.loc[i, FUTURE_ITEMS])
        if len(inside) <= 32:
            assert got == inside["item_id"].tolist()
        else:
            assert len(got) == 32 and set(got) <= set(inside["item_id"])
        offsets = np.asarray(out.loc[i, FUTURE_OFFSETS])
        assert ((offsets >= 1) & (offsets <= window)).all()
        rows_with += len(got) > 0
    assert rows_with > len(labels) // 4


def test_encoding_keeps_the_window_caps_the_targets_and_hashes_like_the_inputs() -> None:
    frame = pd.DataFrame(
        {
            FUTURE_ITEMS: [[5, 6, 7, 8], [], [99]],
            FUTURE_CATEGORIES: [[0, 0, 1, 1], [], [9]],
            FUTURE_OFFSETS: [[10, 20, 30, 40], [], [5]],
        }
    )
    spec = build_input_spec(
        tiny_frame(20).assign(item_seq=[[50]] * 20, category_seq=[[3]] * 20), ()
    )
    enc = encode_future(frame, spec, max_targets=2, window_seconds=35)
    items = spec.sequence_features[0]
    assert items.name == "item_seq" and items.num_embeddings == 52
    # inside 35 s: 5, 6, 7; two of them evenly spaced: positions 0 and 1 (3 // 2 = 1)
    np.testing.assert_array_equal(enc[FUTURE_ITEMS][0], hash_ids(np.array([5, 6]), 52))
    np.testing.assert_array_equal(enc[FUTURE_ITEMS][1], [0, 0])
    # id 99 wraps into the 52-row table exactly as an input id would
    assert (
        enc[FUTURE_ITEMS][2, 0] == hash_ids(np.array([99]), 52)[0] and enc[FUTURE_ITEMS][2, 1] == 0
    )
    whole = encode_future(frame, spec, max_targets=8, window_seconds=None)
    assert (whole[FUTURE_ITEMS][0] != 0).sum() == 4
    kjt = future_kjt({k: v[:2] for k, v in enc.items()}, spec)
    assert kjt.keys() == [f.name for f in spec.sequence_features]  # every feature, in order
    assert kjt["item_seq"].lengths().tolist() == [2, 2]
    assert kjt["event_type_seq"].lengths().tolist() == [0, 0]
    with pytest.raises(InvalidInputError, match="no future targets"):
        encode_future(frame.drop(columns=[FUTURE_OFFSETS]), spec, 2, None)


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows: targets {5, 7}, {7, 9} (7 shared by both rows) and none."""
    e = {5: (1.0, 0.0), 7: (0.6, 0.8), 9: (0.0, 1.0)}
    ids = torch.tensor([[5, 7], [7, 9], [0, 0]])
    emb = torch.tensor([[e.get(int(i), (0.3, 0.3)) for i in row] for row in ids])
    query = torch.tensor([[2.0, 0.0], [0.8, 0.6], [1.0, 1.0]], requires_grad=True)
    return query, emb.requires_grad_(True), ids


def test_in_batch_loss_matches_a_hand_computed_case() -> None:
    query, emb, ids = _hand_case()
    loss, rows, auc_sum, auc_n = in_batch_loss(query, emb, ids, temperature=0.5, score=True)

    def nll(pos: float, negatives: list[float]) -> float:
        return -(pos - math.log(math.exp(pos) + sum(math.exp(n) for n in negatives)))

    # logits = cos / 0.5; row 0 (query (1, 0)): 5 -> 2, 7 -> 1.2, 9 -> 0 (its only negative);
    # row 1 (query (0.8, 0.6)): 5 -> 1.6 (its only negative), 7 -> 1.92, 9 -> 1.2
    row0 = (nll(2.0, [0.0]) + nll(1.2, [0.0])) / 2
    row1 = (nll(1.92, [1.6]) + nll(1.2, [1.6])) / 2
    assert rows.item() == 2  # the row without targets counts for nothing
    assert math.isclose(loss.item(), (row0 + row1) / 2, rel_tol=1e-5)
    # in-batch AUC: 7 and 9 of row 1 against 5 -> 1 and 0; row 0's both above 9 -> 1, 1
    assert auc_n.item() == 4 and math.isclose(auc_sum.item(), 3.0)

    loss.backward()
    assert query.grad is not None and emb.grad is not None
    assert torch.all(query.grad[2] == 0.0)  # no targets: exactly no gradient
    assert torch.all(emb.grad[2] == 0.0) and torch.all(query.grad[:2].abs().sum(1) > 0)


def test_a_batch_without_targets_gives_zero_loss_and_zero_gradient() -> None:
    query, emb, _ = _hand_case()
    loss, rows, _, auc_n = in_batch_loss(
        query, emb, torch.zeros(3, 2, dtype=torch.long), 0.1, score=True
    )
    loss.backward()
    assert loss.item() == 0.0 and rows.item() == 0 and auc_n.item() == 0
    assert query.grad is not None and torch.all(query.grad == 0.0)


def _config(run_dir: Path, frame: pd.DataFrame, **kw: object) -> TrainConfig:
    spec = build_input_spec(frame, ("region",), sequence_length=12)
    model = ModelConfig(
        input_spec=spec,
        task_names=task_names_of(frame),
        embedding_dim=16,
        num_heads=2,
        user_dim=16,
        tower_hidden=16,
        dropout=0.0,
        moe=MoEConfig(num_experts=2, num_experts_per_tok=1, expert_hidden=16),
    )
    base: dict[str, object] = dict(
        batch_size=32, max_steps=60, eval_every=20, warmup_steps=5, patience=0, plots=False
    )
    base.update(kw)
    return TrainConfig(str(run_dir), model, **base)  # type: ignore[arg-type]


def test_without_tasks_the_objective_alone_trains_the_vector(tmp_path: Path) -> None:
    frame = tiny_frame(300).drop(columns=["label_click", "label_buy"])
    cfg = _config(tmp_path / "run", frame, future_loss_weight=1.0)
    assert cfg.model.task_names == ()
    result = train(cfg, frame)
    report = result.report
    assert report["test"] == {}
    losses = [h["future_loss"][FUTURE_CATEGORIES] for h in report["history"]["train"]]
    assert losses[-1] < losses[0]
    val = report["history"]["validation"]
    # with no task the future objective's in-batch AUC is the validation score
    assert all(np.isfinite(v["val_score"]) for v in val)
    assert val[-1]["future"][FUTURE_CATEGORIES]["auc"] > 0.6
    assert report["future_test"][FUTURE_CATEGORIES]["auc"] > 0.6
    assert set(report["future_test"]) == set(FUTURE_KINDS)
    assert (tmp_path / "run" / "model.pt").is_file()


def test_the_objective_off_leaves_no_trace_and_needs_no_targets(tmp_path: Path) -> None:
    frame = tiny_frame(200).drop(columns=[FUTURE_ITEMS, FUTURE_CATEGORIES, FUTURE_OFFSETS])
    cfg = _config(tmp_path / "off", frame, future_loss_weight=0.0, max_steps=10)
    report = train(cfg, frame).report
    assert "future_test" not in report and "future_loss" not in report["history"]["train"][0]
    on = _config(tmp_path / "on", frame, max_steps=10)
    with pytest.raises(InvalidInputError, match="no future targets"):
        train(on, frame)


def test_config_refuses_bad_future_settings(tmp_path: Path) -> None:
    model = ModelConfig(input_spec=InputSpec(), task_names=("a",))
    for bad, match in (
        ({"future_loss_weight": -1.0}, "future_loss_weight"),
        ({"future_targets": 0}, "future_targets"),
        ({"future_temperature": 0.0}, "future_temperature"),
        ({"future_window_seconds": 0}, "future_window_seconds"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            TrainConfig(str(tmp_path), model, **bad)  # type: ignore[arg-type]
    no_tasks = ModelConfig(input_spec=InputSpec(), task_names=())
    with pytest.raises(InvalidInputError, match="nothing to train"):
        TrainConfig(str(tmp_path), no_tasks, future_loss_weight=0.0)
    # a config written before the objective existed reads back as trained without it
    d = TrainConfig(str(tmp_path), model).to_dict()
    del d["future_loss_weight"]
    assert TrainConfig.from_dict(d).future_loss_weight == 0.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_labels_without_task_columns_build_train_and_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str, capsys
) -> None:
    from userembed.commands import main as cli
    from userembed.registry import DEFAULT_MODEL, Registry

    home = tmp_path / "home"
    monkeypatch.setenv("USEREMBED_HOME", str(home))
    monkeypatch.setenv("REDIS_URL", redis_url)
    for var in ("USEREMBED_OFFLINE_DIR", "USEREMBED_FEAST_REGISTRY", "USEREMBED_REGISTRY_ROOT"):
        monkeypatch.delenv(var, raising=False)
    events, users, labels, _ = generate_synthetic(300, seed=0)
    flags = []
    for flag, df in (
        ("events", events),
        ("users-file", users[["user_id", "region"]]),
        ("labels", labels[["user_id", "label_timestamp"]]),  # cuts only, no task
    ):
        path = tmp_path / f"{flag}.parquet"
        df.to_parquet(path, index=False)
        flags += [f"--{flag}", str(path)]
    assert cli.main(["data", "build", "--source", "parquet", *flags]) == 0
    spec = json.loads((home / "data" / "spec.json").read_text())
    assert spec["tasks"] == [] and spec["future_window_seconds"] == 7 * DAY  # the cut cadence
    built = pd.read_parquet(home / "data" / "labels.parquet")
    assert {FUTURE_ITEMS, FUTURE_CATEGORIES, FUTURE_OFFSETS} <= set(built.columns)

    assert cli.main(["feast", "apply", "--fresh"]) == 0
    argv = ["train", "--run-id", "ssl", "--max-steps", "12",
            "--batch-size", "64", "--eval-every", "6", "--embedding-dim", "16"]  # fmt: skip
    assert cli.main(argv) == 0
    run = home / "runs" / "ssl"
    report = json.loads((run / "report.json").read_text())
    assert report["test"] == {} and report["config"]["model"]["task_names"] == []
    assert np.isfinite(report["future_test"][FUTURE_ITEMS]["auc"])
    assert report["config"]["future_loss_weight"] > 0
    assert "ssl: 12 steps" in capsys.readouterr().out

    assert cli.main(["export", "--run", str(run)]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["user_vector_max_abs_diff"] < 1e-4
    manifest = Registry().read_manifest(DEFAULT_MODEL, summary["version"])
    assert manifest.task_names == () and manifest.variants[0].outputs == ("user_vector",)


@pytest.mark.parametrize("arch", ["supermoe", "shared_bottom", "mmoe", "ple"])
def test_every_dense_arch_trains_on_the_objective_without_tasks(arch: str) -> None:
    from trainer.batches import encode_split, make_batch
    from trainer.future_loss import future_loss_of
    from trainer.model import SuperMoEModel

    frame = tiny_frame(60).drop(columns=["label_click", "label_buy"])
    cfg = _config(Path("unused"), frame)
    cfg = cfg.with_(model=replace(cfg.model, dense_arch=arch))
    split = encode_split(frame, cfg.model.input_spec, ())
    split.future = encode_future(frame, cfg.model.input_spec, cfg.future_targets, None)
    batch = make_batch(split, np.arange(32), cfg.model.input_spec)
    model = SuperMoEModel(cfg.model, future_loss=future_loss_of(cfg))
    out, loss = model(
        batch.seq_kjt, batch.profile_kjt, batch.labels, batch.future_kjt, batch.long_term
    )
    assert out.task_logits.shape == (32, 0) and loss is not None and loss.future is not None
    loss.total.backward()
    assert loss.total.item() > 0
    assert all(p.grad is not None for p in model.future_loss.parameters())  # type: ignore[union-attr]

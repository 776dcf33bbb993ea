"""ONNX export: parity with PyTorch on every expert, registry entry, external data, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.output import last_json
from tests.trainer.frames import tiny_frame
from trainer.batches import build_input_spec, task_names_of
from trainer.config import ModelConfig, MoEConfig, TrainConfig
from trainer.export import (
    ExportableEncoder,
    ExportParityError,
    ExportResult,
    expert_covering_inputs,
    export_model,
    moe_layers,
    onnx_files,
    parity,
    publish,
    random_inputs,
)
from trainer.export.coverage import routing_tie_margin
from trainer.model import load_final
from trainer.run_dir import FINAL_CHECKPOINT
from trainer.train import train
from userembed.commands import main as cli
from userembed.errors import CorruptModelError, DataNotFoundError
from userembed.features import (
    LONG_TERM_INPUT,
    LongTermSpec,
    encode_inputs,
)
from userembed.registry import Registry


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SUPERMOE model trained for a few steps (2 MoE layers x 4 experts, top-2)."""
    frame = tiny_frame(200)
    spec = build_input_spec(frame, ("gender", "region"), sequence_length=12)
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        run_dir=str(out),
        model=ModelConfig(
            input_spec=spec,
            task_names=task_names_of(frame),
            embedding_dim=16,
            num_heads=2,
            user_dim=8,
            tower_hidden=8,
            moe=MoEConfig(num_experts=4, expert_hidden=16),
        ),
        batch_size=32,
        max_steps=20,
        eval_every=10,
        checkpoint_every=10,
        plots=True,
    )
    train(cfg, frame)
    frame.to_parquet(out / "frame.parquet")
    return out


def test_export_publishes_entry_with_parity_figures_and_variants(
    run_dir: Path, tmp_path: Path
) -> None:
    result = export_model(
        run_dir,
        str(tmp_path / "reg"),
        "supermoe",
        ("fp32", "fp16", "int8"),
        heldout=run_dir / "frame.parquet",
    )
    reg = Registry(tmp_path / "reg")
    assert reg.resolve("supermoe", "latest") == result.version
    m = reg.read_manifest("supermoe")
    p = m.parity
    assert p["heldout_source"].endswith("frame.parquet") and p["heldout_rows"] == 40  # test split
    assert all(all(row) for row in p["expert_coverage"]) and len(p["expert_coverage"]) == 2
    assert all(all(row) for row in p["experts_in_graph"])
    for case in ("heldout", "crafted", "batch1", "half_length"):
        assert p["fp32"][case]["user_vector_max_abs_diff"] <= 1e-4
        assert p["fp32"][case]["near_tie_rows"] <= 0.05 * p["fp32"][case]["rows"]
    assert p["fp32"]["torchrec_vs_export_max_abs_diff"] <= 1e-4
    assert p["fp16"]["cosine_to_fp32_min"] >= 0.999
    assert 0.0 < p["int8"]["cosine_to_fp32_mean"] <= 1.0 + 1e-6
    assert [v.name for v in m.variants] == ["fp32", "fp16", "int8"]
    assert m.variant("fp32").outputs == ("user_vector", "task_scores")
    # The long-term input: in every variant's inputs, its rules in the manifest's InputSpec.
    assert all(v.inputs[-1] == LONG_TERM_INPUT for v in m.variants)
    assert m.input_spec.long_term == LongTermSpec(attribute_buckets=0)  # no items table
    assert m.task_names == ("click", "buy") and "test" in m.metrics
    assert m.input_spec.feature_service == "user_serving_v1"
    assert m.training_config["model"]["embedding_dim"] == 16
    assert {a.path for a in m.attachments} >= {"report.json", "plots/auc.png"}

    # The served path: verified bytes -> onnxruntime -> same vectors as the trained model.
    loaded = reg.load_verified("supermoe", result.version)
    sess = ort.InferenceSession(loaded.session_source(), providers=["CPUExecutionProvider"])
    frame = tiny_frame(200)
    cols = m.input_spec.feature_names()
    assert set(LongTermSpec(attribute_buckets=0).feature_names) <= set(cols)
    inputs = encode_inputs({c: frame[c].tolist()[:16] for c in cols}, m.input_spec)
    vec, scores = sess.run(None, inputs)
    cfg, tables, dense = load_final(run_dir / FINAL_CHECKPOINT)
    enc = ExportableEncoder(cfg, tables, dense).eval()
    with torch.no_grad():
        ref = enc(*(torch.from_numpy(inputs[n]) for n in enc.input_names))
    np.testing.assert_allclose(vec, ref[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-5)
    assert scores.shape == (16, 2) and ((scores > 0) & (scores < 1)).all()


def test_cli_export_with_external_data_is_hashed_verified_and_loaded(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", "--run", str(run_dir), "--registry-root", str(tmp_path / "reg")]
    rc = cli.main([*argv, "--model-name", "m", "--external-data-threshold-mb", "0"])
    assert rc == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["user_vector_max_abs_diff"] <= 1e-4
    reg = Registry(tmp_path / "reg")
    loaded = reg.load_verified("m")
    result = ExportResult(loaded.manifest, reg.root, dict(loaded.manifest.parity))
    assert result.version == summary["version"]
    v = result.manifest.variant("fp32")
    assert [e.path for e in v.external_data] == ["onnx/encoder_fp32.onnx.data"]
    assert loaded.session_source() == str(loaded.onnx_path)  # data file found beside it
    sess = ort.InferenceSession(loaded.session_source(), providers=["CPUExecutionProvider"])
    spec = result.manifest.input_spec
    x = random_inputs(spec, 3, np.random.default_rng(1))
    assert sess.run(None, x)[0].shape == (3, result.manifest.vector.dim)

    data = tmp_path / "reg" / "m" / result.version / "onnx" / "encoder_fp32.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptModelError, match=r"encoder_fp32\.onnx\.data sha256"):
        reg.load_verified("m")


def _break_expert(how: str):  # type: ignore[no-untyped-def]
    """An export_onnx that writes a graph whose expert 1 of MoE layer 0 is not the trained one,
    as a trace that lost or mangled an expert would."""
    real = onnx_files.export_onnx

    def broken(enc: ExportableEncoder, path: Path, example) -> None:  # type: ignore[no-untyped-def]
        bad = copy.deepcopy(enc)
        expert = moe_layers(bad)[0].experts[1]
        with torch.no_grad():
            if how == "output":
                expert.w2.weight.mul_(3.0)  # w1 intact: only inputs reaching it can tell
            else:
                expert.w1.weight.zero_()
        real(bad, path, example)

    return broken


@pytest.mark.parametrize("how", ["output", "weights"])
def test_export_that_mangles_an_expert_fails_and_publishes_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setattr(publish, "export_onnx", _break_expert(how))
    with pytest.raises(ExportParityError) as e:
        export_model(run_dir, str(tmp_path / "reg"), "m")
    assert "crafted: user vector" in str(e.value)
    if how == "weights":
        assert "expert 1 of MoE layer 0 is missing from the ONNX graph" in str(e.value)
    assert Registry(tmp_path / "reg").list_models() == []


def test_export_that_mangles_the_long_term_path_fails_parity(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parity feeds the long-term input: a graph that reads it wrongly is refused."""
    real = onnx_files.export_onnx

    def broken(enc: ExportableEncoder, path: Path, example) -> None:  # type: ignore[no-untyped-def]
        bad = copy.deepcopy(enc)
        with torch.no_grad():
            bad.dense_arch.encoder.long_term_norm.scale.mul_(2.0)
        real(bad, path, example)

    monkeypatch.setattr(publish, "export_onnx", broken)
    with pytest.raises(ExportParityError, match="heldout: user vector"):
        export_model(run_dir, str(tmp_path / "reg"), "m")
    assert Registry(tmp_path / "reg").list_models() == []


def test_rows_on_a_routing_tie_are_counted_and_left_out_of_the_maximum() -> None:
    """onnxruntime may pick the other expert where two router logits tie to rounding: such a
    row's difference is not a broken graph, and is left out (counted) instead."""
    ref = (np.zeros((3, 2), np.float32),)
    got = (np.array([[0.0, 1e-7], [0.0, 5e-2], [0.0, 0.0]], np.float32),)
    d = parity.diffs(got, ref, np.array([False, True, False]))
    assert d["near_tie_rows"] == 1 and d["rows"] == 3
    assert d["user_vector_max_abs_diff"] == pytest.approx(1e-7)
    assert parity.diffs(got, ref, np.zeros(3, bool))["user_vector_max_abs_diff"] > 1e-2


def test_routing_tie_margin_finds_experts_whose_gates_tie(run_dir: Path) -> None:
    cfg, tables, dense = load_final(run_dir / FINAL_CHECKPOINT)
    enc = ExportableEncoder(cfg, tables, dense).eval()
    rows = random_inputs(cfg.input_spec, 64, np.random.default_rng(0))
    assert (routing_tie_margin(enc, rows) > parity.ROUTER_TIE).mean() > 0.9
    gate = moe_layers(enc)[0].gate.weight
    with torch.no_grad():  # experts 2 and 3 get one gate row: their logits tie on every token
        gate[3] = gate[2]
    tied = routing_tie_margin(enc, rows) == 0.0
    with torch.no_grad():  # rows where 2 and 3 are the k-th and (k+1)-th choice of a token
        out = enc.dense_forward(*(torch.from_numpy(rows[n]) for n in enc.input_names))
    logits = out.router_stats[0].router_logits
    second_third = torch.topk(logits, 3, dim=-1).indices[:, 1:].sort(dim=-1).values
    on_tie = (second_third == torch.tensor([2, 3])).all(dim=-1).reshape(64, -1)
    real = np.concatenate([np.ones((64, 1), bool), rows[enc.sequence_names[0]] != 0], axis=1)
    assert tied.any() and (tied == (on_tie.numpy() & real).any(axis=1)).all()


def test_export_refuses_when_too_many_rows_sit_on_a_routing_tie(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leaving near-tie rows out must not hide a graph: past MAX_TIE_SHARE the export fails."""
    monkeypatch.setattr(parity, "ROUTER_TIE", np.inf)  # every row counts as a near tie
    with pytest.raises(ExportParityError, match="rows route within inf of a tie"):
        export_model(run_dir, str(tmp_path / "reg"), "m")
    assert Registry(tmp_path / "reg").list_models() == []


def test_held_out_inputs_of_a_run_carry_the_long_term_input(run_dir: Path) -> None:
    with np.load(run_dir / "heldout_inputs.npz") as z:
        lt = z[LONG_TERM_INPUT]
    assert lt.dtype == np.float32 and lt.shape == (40, LongTermSpec(attribute_buckets=0).width)
    assert (lt[:, 0] == 1).all()  # has_history: the test rows of the tiny frame all have one


def test_crafted_inputs_route_tokens_to_every_expert(run_dir: Path) -> None:
    cfg, tables, dense = load_final(run_dir / FINAL_CHECKPOINT)
    enc = ExportableEncoder(cfg, tables, dense).eval()
    rows, coverage = expert_covering_inputs(enc, seed=3)
    assert coverage == [[True] * 4, [True] * 4]
    # Independent check with the trainer's own router statistics on those rows.
    with torch.no_grad():
        out = enc.dense_forward(*(torch.from_numpy(rows[n]) for n in enc.input_names))
    for stats in out.router_stats:
        assert (stats.expert_load > 0).all()


def test_export_of_missing_run_is_data_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError):
        export_model(tmp_path / "nope", str(tmp_path / "reg"), "m")

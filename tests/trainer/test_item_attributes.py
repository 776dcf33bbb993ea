"""Item side information in the model: TorchRec tables pooled per event, the exported ONNX
encoder, the attribute map shipped and verified in the registry entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.trainer.frames import tiny_frame
from trainer.batches import build_input_spec, encode_split, make_batch, task_names_of
from trainer.config import ModelConfig, MoEConfig, TrainConfig
from trainer.export import ExportableEncoder, export_model
from trainer.model import build_dense_arch, load_final, load_unsharded
from trainer.run_dir import FINAL_CHECKPOINT, RunDir
from trainer.tables import table_name
from trainer.train import train
from userembed.errors import CorruptModelError
from userembed.features import LongTermSpec, encode_inputs
from userembed.items import ItemAttributeMap, items_frame
from userembed.registry import Registry

PROFILE = ("gender", "region")


def item_map() -> ItemAttributeMap:
    """tiny_frame's items 0..39 (item // 10 = its category): every item lists its category
    and a parity tag, item 7 has no tags, and a brand (item mod 3), unknown for item 5."""
    ids = np.arange(40, dtype=np.int64)
    items = pd.DataFrame(
        {
            "item_id": ids,
            "tags": [np.array([i // 10, 4 + i % 2] if i != 7 else [], np.int64) for i in ids],
            "brand": pd.array([None if i == 5 else i % 3 for i in ids], dtype="Int64"),
        }
    )
    return ItemAttributeMap.from_frame(items, items_frame(items, "test items"))


def items_frame_of(n: int) -> pd.DataFrame:
    """tiny_frame with the long-term attribute histogram the data build writes with the items
    table: every tag of every event's item (the sequences stand in for the whole history)."""
    frame = tiny_frame(n)
    m = item_map()
    buckets = LongTermSpec().attribute_buckets
    frame["lt_attribute_counts"] = [
        np.bincount(v[v >= 0] % buckets, minlength=buckets).tolist()
        for v in (m.lookup(np.asarray(items, np.int64))["tags"] for items in frame["item_seq"])
    ]
    return frame


def _config(run_dir: Path, frame: pd.DataFrame, items: ItemAttributeMap | None) -> TrainConfig:
    return TrainConfig(
        run_dir=str(run_dir),
        model=ModelConfig(
            input_spec=build_input_spec(frame, PROFILE, sequence_length=12, items=items),
            task_names=task_names_of(frame),
            embedding_dim=16,
            num_heads=2,
            user_dim=8,
            tower_hidden=8,
            moe=MoEConfig(num_experts=4, expert_hidden=16),
        ),
        batch_size=32,
        max_steps=12,
        eval_every=6,
        checkpoint_every=6,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = items_frame_of(200)
    out = tmp_path_factory.mktemp("items-run")
    train(_config(out, frame, item_map()), frame, items=item_map())
    return out


def test_the_map_looks_items_up_and_hashes_their_values() -> None:
    m = item_map()
    spec = build_input_spec(tiny_frame(20), PROFILE, sequence_length=4, items=m)
    assert [(a.name, a.num_embeddings, a.max_values) for a in spec.item_attributes] == [
        ("tags", 7, 2),
        ("brand", 4, 1),
    ]
    rows = {f: [[12, 7, 5, 99], []] for f in ("item_seq", "category_seq")}
    rows |= {f: [[1, 1, 1, 1], []] for f in ("event_type_seq", "gap_bucket_seq")}
    rows |= {f: [0, 1] for f in PROFILE} | {f: [None, None] for f in spec.long_term_names}
    enc = encode_inputs(rows, spec, m)
    # item 12: tags 1, 4 -> rows 2, 5; item 7: no tags; item 99: not in the map; padding: 0
    np.testing.assert_array_equal(enc["item_tags_seq"][0], [[2, 5], [0, 0], [0 + 1, 5 + 1], [0, 0]])
    np.testing.assert_array_equal(enc["item_brand_seq"][0, :, 0], [1, 2, 0, 0])
    assert not enc["item_tags_seq"][1].any() and not enc["item_brand_seq"][1].any()


def test_a_model_without_items_keeps_its_spec_and_signature(tmp_path: Path) -> None:
    frame = tiny_frame(60)
    cfg = _config(tmp_path, frame, None).model
    spec = cfg.input_spec
    assert "item_attributes" not in spec.to_dict() and not spec.item_attributes
    assert spec.long_term is not None and spec.long_term.attribute_buckets == 0
    tables = {
        table_name(f.name): torch.zeros(f.num_embeddings, cfg.embedding_dim)
        for f in spec.sequence_features + spec.profile_features
    }
    enc = ExportableEncoder(cfg, tables, build_dense_arch(cfg))
    assert enc.input_names == (
        "item_seq",
        "category_seq",
        "event_type_seq",
        "gap_bucket_seq",
        "profile",
        "long_term",
    )


def test_export_ships_the_map_and_matches_torchrec(run_dir: Path, tmp_path: Path) -> None:
    assert RunDir(run_dir).item_attributes.is_file()
    result = export_model(run_dir, str(tmp_path / "reg"), "m", ("fp32",))
    m = result.manifest
    assert m.item_attributes is not None and m.item_attributes.path == "item_attributes.npz"
    assert m.variant("fp32").inputs[4:6] == ("item_tags_seq", "item_brand_seq")
    # the items' tags reach the long-term input too (their whole-history histogram)
    assert m.input_spec.long_term is not None and m.input_spec.long_term.attribute_buckets == 32
    fp32 = result.parity["fp32"]
    assert fp32["torchrec_vs_export_max_abs_diff"] <= 1e-4
    assert fp32["heldout"]["user_vector_max_abs_diff"] <= 1e-4

    reg = Registry(tmp_path / "reg")
    loaded = reg.load_verified("m")
    items = loaded.items()
    assert items is not None and items.names == ("tags", "brand")
    # Served path: raw rows + the shipped map -> onnxruntime == the TorchRec model.
    import onnxruntime as ort

    frame = items_frame_of(200).head(24)
    spec = m.input_spec
    inputs = encode_inputs({c: frame[c].tolist() for c in spec.feature_names()}, spec, items)
    sess = ort.InferenceSession(loaded.session_source(), providers=["CPUExecutionProvider"])
    vec = sess.run(["user_vector"], inputs)[0]
    model = load_unsharded(run_dir / FINAL_CHECKPOINT)
    batch = make_batch(encode_split(frame, spec, (), items), np.arange(len(frame)), spec)
    with torch.no_grad():
        ref = model(batch.seq_kjt, batch.profile_kjt, None, long_term=batch.long_term)[0]
    np.testing.assert_allclose(vec, ref.user_vector.numpy(), atol=1e-4)
    assert load_final(run_dir / FINAL_CHECKPOINT)[1]["t_item_tags_seq"].shape == (7, 16)

    # The map is verified like the ONNX file: a changed byte refuses the load.
    path = tmp_path / "reg" / "m" / m.version / "item_attributes.npz"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptModelError, match="item_attributes.npz"):
        reg.load_verified("m")

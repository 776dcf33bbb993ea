"""Manifest validation and the registry: publish, aliases, version order, the verifying loader."""

from __future__ import annotations

import json
import tempfile
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import pytest

from userembed.commands import main as cli
from userembed.errors import CorruptModelError, InvalidInputError, ModelNotFoundError
from userembed.features import FeatureSpec, InputSpec, LongTermSpec
from userembed.manifest import (
    FileEntry,
    Manifest,
    OnnxVariant,
    VectorSpec,
    load_manifest,
    parse_manifest,
    save_manifest,
)
from userembed.registry import Registry, new_version_id

SPEC = InputSpec(
    sequence_length=8,
    sequence_features=(FeatureSpec("item_seq", 101, "user_behavior"),),
    profile_features=(FeatureSpec("gender", 4, "user_profile"),),
)


def make_staging(tmp: Path, payload: bytes = b"onnx-bytes", external: bool = True) -> Manifest:
    """A staging folder with a fake ONNX file, external data and a report, and its manifest."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "onnx").mkdir(exist_ok=True)
    (tmp / "onnx" / "encoder.onnx").write_bytes(payload)
    ext = ()
    if external:
        (tmp / "onnx" / "encoder.onnx.data").write_bytes(bytes(range(256)) * 4)
        ext = (FileEntry.of(tmp, "onnx/encoder.onnx.data"),)
    (tmp / "report.json").write_text(json.dumps({"auc": 0.7}))
    return Manifest(
        model_name="m1",
        vector=VectorSpec(dim=16),
        input_spec=SPEC,
        variants=(
            OnnxVariant(
                name="fp32",
                file=FileEntry.of(tmp, "onnx/encoder.onnx"),
                inputs=("item_seq", "profile"),
                outputs=("user_vector", "task_scores"),
                external_data=ext,
            ),
        ),
        task_names=("click",),
        metrics={"click": {"auc": 0.7}},
        training_config={"lr": 0.01},
        parity={"fp32": {"max_abs_diff": 1e-7}},
        attachments=(FileEntry.of(tmp, "report.json"),),
    )


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    m = make_staging(tmp_path / "s").with_version("20261128T193000Z-abcdef")
    save_manifest(m, tmp_path)
    back = load_manifest(tmp_path)
    assert back == m
    assert back.input_spec.sequence_features[0].num_embeddings == 101
    assert back.variant("fp32").external_data[0].path == "onnx/encoder.onnx.data"


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d["vector"].pop("dim"), "vector.dim"),
        (lambda d: d["variants"][0]["file"].update(sha256="xyz"), "variants[0].file.sha256"),
        (lambda d: d["variants"][0]["file"].update(path="../x.onnx"), "variants[0].file.path"),
        (lambda d: d["variants"][0].update(outputs=["task_scores"]), "variants[0].outputs"),
        (lambda d: d["variants"][0].update(name="fp16"), "'variants' has no 'fp32'"),
        (lambda d: d.update(format_version=99), "format_version"),
        (lambda d: d["input_spec"].pop("sequence_features"), "input_spec"),
    ],
)
def test_manifest_validation_names_what_is_wrong(tmp_path: Path, edit, named: str) -> None:
    d = make_staging(tmp_path).to_dict()
    edit(d)
    with pytest.raises(CorruptModelError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_manifest(json.dumps(d), "m.json")


def test_long_term_rules_round_trip_and_an_older_manifest_has_none(tmp_path: Path) -> None:
    """The long-term parameters travel in the manifest; a manifest written before the input
    existed has no `long_term` key: its model reads no long-term feature."""
    m = make_staging(tmp_path / "s")
    lt = LongTermSpec(category_buckets=16, window_days=(7,), attribute_buckets=4)
    with_lt = replace(m, input_spec=replace(SPEC, long_term=lt))
    back = parse_manifest(with_lt.to_json(), "m.json")
    assert back.input_spec.long_term == lt
    assert back.input_spec.long_term_width == 9 + 16 + 8 + 1 + 4
    assert "user_behavior:lt_category_counts" in back.input_spec.feast_refs()
    assert "user_behavior:lt_attribute_counts" in back.input_spec.feast_refs()
    # long-term rules written before the item attribute histogram existed: it reads none
    d = with_lt.to_dict()
    d["input_spec"]["long_term"].pop("attribute_buckets")
    older = parse_manifest(json.dumps(d), "older.json").input_spec
    assert older.long_term is not None and older.long_term.attribute_buckets == 0
    assert "user_behavior:lt_attribute_counts" not in older.feast_refs()
    d = m.to_dict()
    d["input_spec"].pop("long_term")
    old = parse_manifest(json.dumps(d), "old.json")
    assert old.input_spec.long_term is None and old.input_spec.long_term_names == ()
    assert old.input_spec.feature_names() == ["item_seq", "gender"]
    d["input_spec"]["long_term"] = {"category_buckets": 32}
    with pytest.raises(CorruptModelError, match="input_spec"):
        parse_manifest(json.dumps(d), "bad.json")


def test_manifest_that_is_not_json_is_corrupt() -> None:
    with pytest.raises(CorruptModelError, match="not valid JSON"):
        parse_manifest(b"{oops", "m.json")


def test_publish_then_load_verified_hands_out_checked_bytes(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    m = reg.publish(make_staging(tmp_path / "s"), tmp_path / "s")
    assert reg.list_models() == ["m1"]
    assert reg.list_versions("m1") == [m.version]
    assert reg.resolve("m1") == m.version  # latest moved on publish
    loaded = reg.load_verified("m1", "latest")
    assert loaded.onnx_bytes == b"onnx-bytes"
    assert loaded.onnx_path == tmp_path / "reg" / "m1" / m.version / "onnx" / "encoder.onnx"
    # External data must be found beside the file: hand onnxruntime the path.
    assert loaded.session_source() == str(loaded.onnx_path)
    assert loaded.manifest.created_at.endswith("Z") and loaded.version == m.version


def test_loader_refuses_one_flipped_byte(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    m = reg.publish(make_staging(tmp_path / "s", external=False), tmp_path / "s")
    f = tmp_path / "reg" / "m1" / m.version / "onnx" / "encoder.onnx"
    data = bytearray(f.read_bytes())
    data[3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptModelError, match=r"encoder\.onnx sha256"):
        reg.load_verified("m1")


def test_loader_lists_every_problem_in_one_error(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    m = reg.publish(make_staging(tmp_path / "s"), tmp_path / "s")
    vdir = tmp_path / "reg" / "m1" / m.version
    (vdir / "onnx" / "encoder.onnx.data").write_bytes(b"short")
    (vdir / "report.json").unlink()
    with pytest.raises(CorruptModelError) as e:
        reg.load_verified("m1", m.version)
    assert "encoder.onnx.data has 5 bytes" in str(e.value)
    assert "report.json is missing" in str(e.value)


def test_loader_refuses_manifest_moved_to_another_version(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    m = reg.publish(make_staging(tmp_path / "s"), tmp_path / "s")
    d = json.loads((tmp_path / "reg" / "m1" / m.version / "manifest.json").read_text())
    d["version"] = "20000101T000000Z-000000"
    (tmp_path / "reg" / "m1" / m.version / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CorruptModelError, match="lies at"):
        reg.load_verified("m1")


def test_publish_refuses_files_that_do_not_match_the_manifest(tmp_path: Path) -> None:
    m = make_staging(tmp_path / "s")
    (tmp_path / "s" / "onnx" / "encoder.onnx").write_bytes(b"onnx-bytez")
    reg = Registry(tmp_path / "reg")
    with pytest.raises(CorruptModelError, match="refusing to publish"):
        reg.publish(m, tmp_path / "s")
    assert reg.list_models() == []


def test_versions_sort_by_time_and_aliases_move(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    late = reg.publish(
        make_staging(tmp_path / "a", b"a"),
        tmp_path / "a",
        now=datetime(2026, 11, 28, 19, tzinfo=UTC),
    )
    early = reg.publish(
        make_staging(tmp_path / "b", b"b"), tmp_path / "b", now=datetime(2026, 1, 2, 3, tzinfo=UTC)
    )
    assert reg.list_versions("m1") == [early.version, late.version]
    assert early.version.startswith("20260102T030000Z-")
    assert reg.resolve("m1", "latest") == early.version  # latest = last published, not newest id
    assert reg.set_alias("m1", "prod", late.version) == late.version
    assert reg.set_alias("m1", "canary", "prod") == late.version  # alias of an alias
    assert reg.aliases("m1") == {
        "latest": early.version,
        "prod": late.version,
        "canary": late.version,
    }
    assert reg.load_verified("m1", "prod").onnx_bytes == b"a"
    with pytest.raises(InvalidInputError):
        reg.set_alias("m1", "Bad Alias", late.version)


def test_same_content_within_one_second_gets_distinct_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    now = datetime(2026, 11, 28, 19, 30, tzinfo=UTC)
    a = reg.publish(make_staging(tmp_path / "s"), tmp_path / "s", now=now)
    b = reg.publish(make_staging(tmp_path / "s"), tmp_path / "s", now=now)
    assert a.version != b.version and len(reg.list_versions("m1")) == 2
    assert new_version_id("ab" * 32, now) == "20261128T193000Z-ababab"


def test_unknown_model_version_and_alias_raise_model_not_found(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        reg.load_verified("nope")
    with pytest.raises(ModelNotFoundError):
        reg.list_versions("nope")
    reg.publish(make_staging(tmp_path / "s"), tmp_path / "s")
    with pytest.raises(ModelNotFoundError, match="no version"):
        reg.resolve("m1", "20000101T000000Z-000000")
    with pytest.raises(ModelNotFoundError, match="no alias 'prod'"):
        reg.load_verified("m1", "prod")
    with pytest.raises(CorruptModelError, match="no ONNX variant 'int8'"):
        reg.load_verified("m1", variant="int8")


def test_memory_filesystem_registry_downloads_and_verifies(tmp_path: Path) -> None:
    root = f"memory://reg-{uuid.uuid4().hex}"
    reg = Registry(root)
    try:
        m = reg.publish(make_staging(tmp_path / "s"), tmp_path / "s")
        loaded = reg.load_verified("m1", download_dir=tmp_path / "dl")
        assert loaded.onnx_path.read_bytes() == b"onnx-bytes"
        assert (tmp_path / "dl" / "onnx" / "encoder.onnx.data").read_bytes() == bytes(
            range(256)
        ) * 4
        fs = fsspec.filesystem("memory")
        fs.pipe_file(f"{root}/m1/{m.version}/onnx/encoder.onnx", b"onnx-bytez")
        with pytest.raises(CorruptModelError, match="sha256"):
            reg.load_verified("m1", download_dir=tmp_path / "dl2")
    finally:
        fsspec.filesystem("memory").rm(root, recursive=True)


def test_remote_load_into_a_temporary_folder_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server hot-reloads for weeks: each remote load's download folder must go once the
    # session holds the model, and at once when the load is refused.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    root = f"memory://reg-{uuid.uuid4().hex}"
    reg = Registry(root)
    try:
        m = reg.publish(make_staging(tmp_path / "s"), tmp_path / "s")
        loaded = reg.load_verified("m1")
        assert loaded.temporary and loaded.onnx_path.read_bytes() == b"onnx-bytes"
        loaded.release()
        assert list((tmp_path / "tmp").iterdir()) == []
        fsspec.filesystem("memory").pipe_file(f"{root}/m1/{m.version}/report.json", b"{}")
        with pytest.raises(CorruptModelError, match="report.json"):
            reg.load_verified("m1")
        assert list((tmp_path / "tmp").iterdir()) == []
    finally:
        fsspec.filesystem("memory").rm(root, recursive=True)
    local = Registry(tmp_path / "reg")
    local.publish(make_staging(tmp_path / "s2"), tmp_path / "s2")
    in_place = local.load_verified("m1")
    in_place.release()  # a local registry is read in place: release deletes nothing
    assert not in_place.temporary and in_place.onnx_path.exists()


def test_registry_cli_lists_aliases_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reg = Registry(tmp_path / "reg")
    m = reg.publish(make_staging(tmp_path / "s"), tmp_path / "s")
    root = ["registry", "--root", str(tmp_path / "reg")]
    assert cli.main([*root, "alias", "m1", "prod", "latest"]) == 0
    assert cli.main([*root, "list", "m1"]) == 0
    assert cli.main([*root, "inspect", "m1", "prod", "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"{m.version}\tlatest,prod" in out
    assert "3 files match their sha256" in out
    assert cli.main([*root, "inspect", "nope"]) == 2  # one-line error, exit 2
    assert "unknown model 'nope'" in capsys.readouterr().err

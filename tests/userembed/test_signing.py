"""Manifest signatures: a signing registry signs on publish, a verifying one refuses unsigned,
wrongly signed and edited versions with UntrustedModelError, and bad keys fail at start."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.signing_keys import write_keypair
from tests.userembed.test_manifest_registry import make_staging
from userembed.errors import CorruptModelError, InvalidInputError, UntrustedModelError
from userembed.manifest import MANIFEST_FILE
from userembed.registry import Registry
from userembed.signing import SIGNATURE_FILE

MODEL = "m1"  # make_staging's model


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[str, str]]:
    return {name: write_keypair(tmp_path / "keys", name) for name in ("ours", "theirs")}


def _publish(root: Path, staging: Path, signing_key: str) -> str:
    reg = Registry(root, signing_key=signing_key, verify_key="")
    return reg.publish(make_staging(staging), staging).version


def test_signed_version_loads_with_the_matching_public_key(tmp_path: Path, keys) -> None:
    signing, verify = keys["ours"]
    version = _publish(tmp_path / "reg", tmp_path / "s", signing)
    vdir = tmp_path / "reg" / MODEL / version
    assert json.loads((vdir / SIGNATURE_FILE).read_text())["algorithm"] == "ed25519"
    loaded = Registry(tmp_path / "reg", verify_key=verify).load_verified(MODEL)
    assert loaded.version == version
    # Without a verifying key the signature is not needed, nor checked.
    assert Registry(tmp_path / "reg", verify_key="").load_verified(MODEL).version == version


@pytest.mark.parametrize("case", ["unsigned", "other key", "manifest edited", "garbled"])
def test_verifying_registry_refuses_untrusted_versions(tmp_path: Path, keys, case: str) -> None:
    signing = {"unsigned": "", "other key": keys["theirs"][0]}.get(case, keys["ours"][0])
    version = _publish(tmp_path / "reg", tmp_path / "s", signing)
    vdir = tmp_path / "reg" / MODEL / version
    if case == "manifest edited":  # the files still match their sha256: only the signature tells
        m = json.loads((vdir / MANIFEST_FILE).read_text())
        m["metrics"] = {"test": {"click": {"auc": 0.99}}}
        (vdir / MANIFEST_FILE).write_text(json.dumps(m, indent=2))
    if case == "garbled":
        (vdir / SIGNATURE_FILE).write_text("{not json")
    reg = Registry(tmp_path / "reg", verify_key=keys["ours"][1])
    expected = {
        "unsigned": "unsigned",
        "other key": "does not verify",
        "manifest edited": "does not verify",
        "garbled": "unreadable",
    }[case]
    for read in (reg.load_verified, reg.read_manifest):
        with pytest.raises(UntrustedModelError, match=expected) as e:
            read(MODEL)
        assert isinstance(e.value, CorruptModelError)  # loaders refuse it like a corrupt one
        assert f"{MODEL}/{version}" in str(e.value)


def test_keys_come_from_the_environment_by_default(tmp_path: Path, keys, monkeypatch) -> None:
    signing, verify = keys["ours"]
    _publish(tmp_path / "reg", tmp_path / "s", "")
    monkeypatch.setenv("USEREMBED_MODEL_VERIFY_KEY", verify)
    with pytest.raises(UntrustedModelError, match="unsigned"):
        Registry(tmp_path / "reg").load_verified(MODEL)  # what the refresh job builds
    monkeypatch.setenv("USEREMBED_MODEL_SIGNING_KEY", signing)
    version = Registry(tmp_path / "reg").publish(make_staging(tmp_path / "s2"), tmp_path / "s2")
    assert Registry(tmp_path / "reg").load_verified(MODEL).version == version.version


def test_bad_keys_fail_when_the_registry_is_built(tmp_path: Path, keys) -> None:
    signing, verify = keys["ours"]
    with pytest.raises(InvalidInputError, match="public key only"):
        Registry(tmp_path, verify_key=signing)  # a loader must not hold the signing key
    with pytest.raises(InvalidInputError, match="cannot read"):
        Registry(tmp_path, verify_key=str(tmp_path / "absent.pem"))
    with pytest.raises(InvalidInputError, match="not an unencrypted PEM key"):
        Registry(tmp_path, signing_key=verify)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_keys_made_by_openssl_as_the_docs_say(tmp_path: Path) -> None:
    signing, verify = tmp_path / "signing.pem", tmp_path / "verify.pem"
    run = dict(check=True, capture_output=True, timeout=30)
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", signing], **run)
    subprocess.run(["openssl", "pkey", "-in", signing, "-pubout", "-out", verify], **run)
    version = _publish(tmp_path / "reg", tmp_path / "s", str(signing))
    assert Registry(tmp_path / "reg", verify_key=str(verify)).load_verified(MODEL).version == (
        version
    )

"""A server with a verifying key (model_verify_key) over gRPC: it serves signed versions, refuses
an unsigned or wrongly signed one while the previous version keeps serving, and moves on to
the next signed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embed_server.client import EmbeddingClient
from tests.embed_server.conftest import MODEL, publish_tiny
from tests.signing_keys import write_keypair
from tests.waiting import wait_for
from userembed.manifest import MANIFEST_FILE
from userembed.registry import Registry


@pytest.mark.parametrize("case", ["unsigned", "other key", "manifest edited"])
def test_untrusted_version_is_refused_and_the_signed_one_keeps_serving(
    start_server, registry: Registry, tmp_path: Path, case: str
) -> None:
    ours, verify = write_keypair(tmp_path / "keys", "ours")
    theirs, _ = write_keypair(tmp_path / "keys", "theirs")
    publisher = Registry(registry.root, signing_key=ours, verify_key="")
    v1 = publish_tiny(publisher, tmp_path / "staging", seed=1)
    srv = start_server(model_verify_key=verify)
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        wait_for(lambda: c.health() == "SERVING", "the signed version to load")
        assert c.get("1").model_version == v1

        signing = {"unsigned": "", "other key": theirs, "manifest edited": ours}[case]
        bad = Registry(registry.root, signing_key=signing, verify_key="")
        v2 = publish_tiny(bad, tmp_path / "staging", seed=2, aliases=())
        if case == "manifest edited":  # same files: the sha256 checks pass, the signature not
            path = Path(registry.version_dir(MODEL, v2)) / MANIFEST_FILE
            m = json.loads(path.read_text())
            m["metrics"] = {"test": {"click": {"auc": 0.99}}}
            path.write_text(json.dumps(m))
        registry.set_alias(MODEL, "latest", v2)
        refused = srv.metrics.reloads.labels(MODEL, "refused")
        wait_for(lambda: refused._value.get() >= 1, "the refusal")
        assert c.list_models().models[0].version == v1
        assert c.get("1").model_version == v1
        assert c.health() == "SERVING"

        v3 = publish_tiny(publisher, tmp_path / "staging", seed=3)
        wait_for(lambda: c.list_models().models[0].version == v3, "the next signed version")
        assert c.get("1").model_version == v3

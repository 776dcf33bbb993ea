"""The README's main command, end to end on a tiny configuration (real Redis, Feast, TorchRec,
ONNX, onnxruntime, the refresh and a server process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from userembed import paths
from userembed.commands.demo import DemoConfig, run_demo
from userembed.features import LONG_TERM_INPUT
from userembed.registry import DEFAULT_MODEL, Registry


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_ends_with_a_served_embedding(
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("USEREMBED_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REDIS_URL", redis_url)  # run_demo exports it for its stages
    monkeypatch.delenv("USEREMBED_REGISTRY_ROOT", raising=False)
    monkeypatch.delenv("USEREMBED_OFFLINE_DIR", raising=False)
    out = run_demo(
        DemoConfig(users=400, max_steps=20, batch_size=64, redis_url=redis_url, start_redis=False)
    )
    printed = capsys.readouterr().out
    assert "online features of user 1" in printed and "item_seq" in printed
    assert set(out["test_auc"]) == {"click", "purchase", "churn", "explore"}
    assert out["parity_max_abs_diff"] < 1e-4
    assert out["served"]["dim"] == 64
    assert out["served"]["source"] == "stored"  # the refresh wrote it; the server read it
    assert "GetUserEmbedding(user_id=1) [recomputed]" in printed
    # the refresh (offline files) and the recompute (Feast online store) saw the same features,
    # the long-term ones included (the trained model reads them)
    assert out["served"]["stored_vs_recomputed_max_abs_diff"] < 1e-4
    # ... for a sample of users too: the consistency check that ends the demo
    assert out["check"]["ok"] and out["check"]["vectors_checked"] > 0, out["check"]
    manifest = Registry(paths.registry_root()).read_manifest(DEFAULT_MODEL)
    assert manifest.input_spec.long_term is not None
    assert LONG_TERM_INPUT in manifest.variant("fp32").inputs

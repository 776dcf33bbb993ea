"""Server settings: YAML + USEREMBED_* environment, unknown keys rejected."""

from __future__ import annotations

import pytest

from embed_server.settings import SettingsError, load_settings


def test_yaml_then_env_then_overrides(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("grpc_port: 7000\nmodels: [a, b]\nbatch_size: 16\nbatch_wait_ms: 3\n")
    s = load_settings(cfg, env={"USEREMBED_BATCH_SIZE": "32", "USEREMBED_MODELS": "c"}, grpc_port=0)
    assert (s.grpc_port, s.models, s.batch_size, s.batch_wait_ms) == (0, ("c",), 32, 3.0)


def test_unknown_yaml_key_is_rejected(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("grpc_port: 1\nbatchsize: 3\n")
    with pytest.raises(SettingsError, match="unknown keys \\['batchsize'\\]"):
        load_settings(cfg, env={})


def test_bad_values_are_rejected():
    with pytest.raises(SettingsError, match="USEREMBED|grpc_port"):
        load_settings(env={"USEREMBED_GRPC_PORT": "http"})
    with pytest.raises(SettingsError, match="tls_cert and tls_key"):
        load_settings(env={}, tls_cert="/x.pem")
    with pytest.raises(SettingsError, match="default_model"):
        load_settings(env={}, models=("a",), default_model="b")
    with pytest.raises(SettingsError, match="compute_workers"):
        load_settings(env={}, compute_workers=0)


def test_encoder_threads_split_the_cores_between_compute_workers(monkeypatch):
    monkeypatch.setattr("embed_server.settings.usable_cores", lambda: 8)
    one = {"workers": 1}  # one server process
    assert load_settings(env={}, **one).encoder_threads() == 4  # 2 compute workers by default
    assert load_settings(env={}, compute_workers=3, **one).encoder_threads() == 2
    assert load_settings(env={}, compute_workers=16, **one).encoder_threads() == 1
    # by default one server process per core: their runs share the cores too
    assert load_settings(env={}).worker_count() == 8
    assert load_settings(env={}).encoder_threads() == 1
    assert load_settings(env={}, workers=2).encoder_threads() == 2


def test_usable_cores_reads_a_cgroup_cpu_quota(tmp_path):
    from embed_server.settings import _cgroup_cpu_quota

    f = tmp_path / "cpu.max"
    f.write_text("150000 100000\n")
    assert _cgroup_cpu_quota(str(f)) == 2  # 1.5 CPUs: rounded up
    f.write_text("max 100000\n")
    assert _cgroup_cpu_quota(str(f)) is None
    assert _cgroup_cpu_quota(str(tmp_path / "absent")) is None
    assert load_settings(env={"USEREMBED_INTRA_OP_THREADS": "3"}).encoder_threads() == 3

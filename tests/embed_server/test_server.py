"""The embedding service end to end over gRPC: real Redis, real registry, real onnxruntime."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from embed_server.client import EmbeddingClient, ItemError
from embed_server.version_policy import online_version
from tests.embed_server.conftest import DIM, MODEL, SPEC, FakeFeatures, publish_tiny
from tests.waiting import wait_for
from userembed.features import encode_inputs
from userembed.registry import Registry
from userembed.vectors import VectorStore


def expected_vector(srv, user_id: str, features: FakeFeatures) -> np.ndarray:
    model = srv.manager.get(MODEL)
    row = features.users[user_id]
    cols = {f.name: [row[f.name]] for f in SPEC.sequence_features + SPEC.profile_features}
    return model.encoder.run(encode_inputs(cols, SPEC))[0]


@pytest.fixture
def v1(registry: Registry, tmp_path: Path) -> str:
    return publish_tiny(registry, tmp_path / "staging", seed=1)


def test_server_binds_port_zero_and_reports_model(start_server, v1):
    srv = start_server()
    assert srv.port > 0 and srv.metrics_port and srv.metrics_port > 0
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        models = c.list_models()
        assert c.health() == "SERVING"
        assert c.health("userembed.v1.UserEmbeddingService") == "SERVING"
    assert models.default_model == MODEL
    (m,) = models.models
    assert (m.name, m.version, m.dim, m.is_default) == (MODEL, v1, DIM, True)
    assert m.serving_embedding_version == online_version(v1)
    assert m.execution_provider == "CPUExecutionProvider"


@pytest.mark.parametrize("script_reads", [1, 0], ids=["lua-script", "pipeline"])
def test_stored_vector_of_loaded_model_version_is_returned(
    start_server, v1, redis_url, script_reads
):
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    vec = np.arange(DIM, dtype=np.float32)
    store.create_version("ev1", v1)
    store.write("ev1", ["7"], vec[None, :], v1, feature_ts_ms=[123], computed_at_ms=456)
    store.publish("ev1")
    srv = start_server(redis_script_reads=script_reads)
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        e = c.get("7")
        (b,) = c.batch_get(["7"])
    assert e.source == "stored" and b.source == "stored"
    np.testing.assert_array_equal(b.vector, vec)
    assert (e.model_version, e.embedding_version) == (v1, "ev1")
    assert (e.computed_at_ms, e.feature_ts_ms) == (456, 123)
    np.testing.assert_array_equal(e.vector, vec)


def test_packed_batch_of_stored_vectors_returns_exact_floats_in_request_order(
    start_server, v1, redis_url
):
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    vecs = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
    store.create_version("ev1", v1)
    store.write("ev1", ["1", "2", "3"], vecs, v1)
    store.publish("ev1")
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        res = c.batch_get(["3", "1", "2", "3"], packed=True)
    assert [r.source for r in res] == ["stored"] * 4
    np.testing.assert_array_equal(np.stack([r.vector for r in res]), vecs[[2, 0, 1, 2]])


def test_batch_mixing_f32_f16_and_other_version_rows_keeps_each_row_right(
    start_server, v1, redis_url, features
):
    # The batch path fills columns in one pass when every row is a plain f32 hit; one f16 row
    # and one row of another model version send it down the per-row path.
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    vecs = np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32)
    store.create_version("ev1", v1)
    store.write("ev1", ["1", "2"], vecs[:2], v1, computed_at_ms=11)
    store.write("ev1", ["3"], vecs[2:], v1, dtype="f16", computed_at_ms=33)
    store.write("ev1", ["4"], vecs[:1], "another-version")
    store.publish("ev1")
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        for packed in (False, True):
            r1, r3, r4, r2 = c.batch_get(["1", "3", "4", "2"], packed=packed)
            # user 4 is computed and written back by the first call, stored in the second
            r4_source = "stored" if packed else "computed"
            assert [r.source for r in (r1, r3, r4, r2)] == ["stored", "stored", r4_source, "stored"]
            np.testing.assert_array_equal(r1.vector, vecs[0])
            np.testing.assert_array_equal(r2.vector, vecs[1])
            np.testing.assert_array_equal(r3.vector, vecs[2].astype(np.float16).astype(np.float32))
            assert (r1.computed_at_ms, r3.computed_at_ms) == (11, 33)
            np.testing.assert_allclose(r4.vector, expected_vector(srv, "4", features), rtol=1e-6)


def test_vectors_of_another_model_version_are_never_served(start_server, v1, redis_url, features):
    store = VectorStore(redis.Redis.from_url(redis_url), MODEL)
    store.create_version("old", "some-older-version")
    store.write("old", ["7"], np.ones((1, DIM), np.float32), "some-older-version")
    store.publish("old")
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        e = c.get("7")
    assert e.source == "computed"
    assert e.embedding_version == online_version(v1)
    np.testing.assert_allclose(e.vector, expected_vector(srv, "7", features), rtol=1e-6)
    info = store.version_info(online_version(v1))
    assert info is not None and info.model_version == v1 and info.status == "online"


def test_miss_computes_writes_back_and_second_call_is_stored(start_server, v1, redis_url, features):
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        first = c.get("5")
        second = c.get("5")
        forced = c.get("5", force=True)
    assert (first.source, second.source, forced.source) == ("computed", "stored", "computed")
    np.testing.assert_allclose(first.vector, expected_vector(srv, "5", features), rtol=1e-6)
    np.testing.assert_array_equal(second.vector, first.vector)
    assert second.computed_at_ms == first.computed_at_ms
    assert first.feature_ts_ms == features.users["5"]["_ts"]
    ttl = redis.Redis.from_url(redis_url).ttl(f"ue:{MODEL}:{online_version(v1)}:{{5}}")
    assert 0 < ttl <= 7 * 24 * 3600


def test_batch_returns_per_id_status_and_packed_vectors(start_server, v1, features):
    srv = start_server()
    ids = ["1", "", "x" * 200, "999", "abc", "2"]
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        c.get("2")  # stored before the batch
        for packed in (False, True):
            res = c.batch_get(ids, packed=packed)
            codes = [r.code if isinstance(r, ItemError) else grpc.StatusCode.OK for r in res]
            assert codes == [
                grpc.StatusCode.OK,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.OK,
            ], packed
            assert "unknown user" in res[3].message
            assert res[5].source == "stored"
            np.testing.assert_allclose(
                res[0].vector, expected_vector(srv, "1", features), rtol=1e-6
            )
            np.testing.assert_allclose(
                res[5].vector, expected_vector(srv, "2", features), rtol=1e-6
            )


def test_request_errors_map_to_grpc_statuses(start_server, v1):
    srv = start_server(max_batch_ids=3, max_user_id_length=8)
    cases = [
        (lambda c: c.get(""), grpc.StatusCode.INVALID_ARGUMENT, "empty user id"),
        (lambda c: c.get("123456789"), grpc.StatusCode.INVALID_ARGUMENT, "longer than 8"),
        (
            lambda c: c.batch_get(["1", "2", "3", "4"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at most 3",
        ),
        (lambda c: c.get("1", model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (lambda c: c.get("424242"), grpc.StatusCode.NOT_FOUND, "unknown user"),
    ]
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        for call, code, text in cases:
            with pytest.raises(grpc.RpcError) as ei:
                call(c)
            assert ei.value.code() == code, text
            assert text in ei.value.details()
        assert c.get("1").source == "computed"  # still serving after the errors


def test_full_queue_answers_resource_exhausted(start_server, v1):
    srv = start_server(queue_size=2)
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        res = c.batch_get(["1", "2", "3"])
        assert [r.code for r in res] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
        assert "queue full" in res[0].message
        assert len(c.batch_get(["1", "2"])) == 2  # fits: served


def test_redis_outage_is_unavailable_and_server_recovers(start_server, v1, redis_server):
    srv = start_server()
    target = f"127.0.0.1:{srv.port}"
    with EmbeddingClient(target, timeout_s=20) as c:
        assert c.get("3").source == "computed"
        redis_server.stop()
        try:
            for call in (lambda: c.get("3"), lambda: c.batch_get(["3", "4"])):
                with pytest.raises(grpc.RpcError) as ei:
                    call()
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "redis unavailable" in ei.value.details()
        finally:
            redis_server.start()
        # Redis came back empty (no persistence): computed again, written back, then stored.
        assert c.get("3").source == "computed"
        assert c.get("3").source == "stored"


def test_new_registry_version_is_hot_reloaded(start_server, v1, registry, tmp_path):
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        before = c.get("4")
        v2 = publish_tiny(registry, tmp_path / "staging", seed=2)
        wait_for(lambda: c.list_models().models[0].version == v2, "version 2 to load")
        after = c.get("4")
    assert before.model_version == v1 and after.model_version == v2
    assert after.source == "computed"  # v1's stored vector is not valid for v2
    assert not np.allclose(before.vector, after.vector)


@pytest.mark.parametrize("breakage", ["sha256 mismatch", "wrong output dim"])
def test_broken_new_version_is_refused_and_old_keeps_serving(
    start_server, v1, registry, tmp_path, breakage
):
    srv = start_server()
    if breakage == "sha256 mismatch":
        v2 = publish_tiny(registry, tmp_path / "staging", seed=2, aliases=())
        onnx_file = Path(registry.version_dir(MODEL, v2)) / "encoder.onnx"
        data = bytearray(onnx_file.read_bytes())
        data[-10] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
    else:
        v2 = publish_tiny(registry, tmp_path / "staging", seed=2, out_dim=DIM // 2, aliases=())
    registry.set_alias(MODEL, "latest", v2)
    refused = srv.metrics.reloads.labels(MODEL, "refused")
    wait_for(lambda: refused._value.get() >= 1, "the refusal")
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        assert c.list_models().models[0].version == v1
        assert c.get("1").model_version == v1
        assert c.health() == "SERVING"


def test_health_not_serving_until_a_model_loads(start_server, registry, tmp_path):
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        assert c.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as ei:
            c.get("1")
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        publish_tiny(registry, tmp_path / "staging", seed=1)
        wait_for(lambda: c.health() == "SERVING", "SERVING")
        assert c.get("1").source == "computed"


class GatedFeatures(FakeFeatures):
    """Blocks every fetch until `gate` is set (an in-flight request we control)."""

    def __init__(self, base: FakeFeatures) -> None:
        super().__init__(users=base.users)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def fetch(self, user_ids, spec):
        self.entered.set()
        self.gate.wait(30)
        return super().fetch(user_ids, spec)


def test_drain_reports_not_serving_and_finishes_in_flight_calls(settings_for, features):
    from grpc_health.v1 import health_pb2

    from embed_server.server import EmbeddingServer
    from tests.embed_server.conftest import LoopThread

    gated = GatedFeatures(features)
    loop = LoopThread()
    try:
        srv = EmbeddingServer(settings_for(drain_grace_s=20), features=gated)
        publish_tiny(srv.registry, Path(srv.registry.root).parent / "staging", seed=1)
        loop.run(srv.start())
        result: dict = {}
        with EmbeddingClient(f"127.0.0.1:{srv.port}", timeout_s=30) as c:
            t = threading.Thread(target=lambda: result.setdefault("e", c.get("6")))
            t.start()
            assert gated.entered.wait(20)
            stopping = loop.loop.call_soon_threadsafe  # schedule stop() without waiting for it
            done = threading.Event()

            def stop() -> None:
                task = loop.loop.create_task(srv.stop())
                task.add_done_callback(lambda _: done.set())

            stopping(stop)
            req = health_pb2.HealthCheckRequest(service="")
            wait_for(
                lambda: (
                    loop.run(srv.health.Check(req, None)).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                "NOT_SERVING while draining",
            )
            gated.gate.set()
            t.join(30)
            assert done.wait(30)
        assert result["e"].source == "computed"  # the in-flight call completed
    finally:
        gated.gate.set()
        loop.close()


def test_metrics_endpoint_counts_requests_and_loaded_version(start_server, v1):
    srv = start_server()
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        c.get("1")
        c.get("1")
        with pytest.raises(grpc.RpcError):
            c.get("")
    body = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics").read().decode()
    assert 'userembed_requests_total{code="OK",method="GetUserEmbedding"} 2.0' in body
    assert 'userembed_requests_total{code="INVALID_ARGUMENT",method="GetUserEmbedding"} 1.0' in body
    assert (
        f'userembed_model_loaded{{model="{MODEL}",provider="CPUExecutionProvider",version="{v1}"}} 1.0'
        in body
    )
    assert 'userembed_vectors_total{model="tiny",source="stored"} 1.0' in body
    assert 'userembed_vectors_total{model="tiny",source="computed"} 1.0' in body
    assert "userembed_request_seconds_bucket" in body


def test_reflection_lists_the_services(start_server, v1):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    srv = start_server()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (resp,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
    names = {s.name for s in resp.list_services_response.service}
    assert {"userembed.v1.UserEmbeddingService", "grpc.health.v1.Health"} <= names

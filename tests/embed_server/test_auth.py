"""Who may call: bearer tokens (one interceptor, health exempt), TLS and mutual TLS, over a real
gRPC server on port 0; and the CLI / client speaking TLS with a token."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from embed_server._proto import embedding_service_pb2 as pb
from embed_server.client import ClientSecurity, EmbeddingClient
from embed_server.server import EmbeddingServer
from embed_server.settings import SettingsError
from tests.embed_server.certs import CertificateAuthority
from tests.embed_server.conftest import publish_tiny
from userembed.commands.main import main
from userembed.registry import Registry


@pytest.fixture
def v1(registry: Registry, tmp_path: Path) -> str:
    return publish_tiny(registry, tmp_path / "staging", seed=1)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(secrets.token_hex(32) + "\n")
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    ca = CertificateAuthority(tmp_path / "pki", "test-ca")
    other = CertificateAuthority(tmp_path / "pki", "other-ca")
    server, client, stranger = (
        ca.issue("server", server=True),
        ca.issue("client", server=False),
        other.issue("stranger", server=False),
    )
    return {
        "ca": ca.pem.cert,
        "server_cert": server.cert,
        "server_key": server.key,
        "client_cert": client.cert,
        "client_key": client.key,
        "stranger_cert": stranger.cert,
        "stranger_key": stranger.key,
        "other_ca": other.pem.cert,
    }


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    return ei.value.code(), ei.value.details()


def _reflect(target: str, metadata: tuple = ()) -> set[str]:
    with grpc.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (resp,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=10,
            metadata=metadata,
        )
    return {s.name for s in resp.list_services_response.service}


def test_token_is_required_for_every_call_but_health(start_server, v1, token_file, caplog):
    caplog.set_level(logging.DEBUG)
    srv = start_server(auth_token_file=str(token_file))
    target = f"127.0.0.1:{srv.port}"
    token = token_file.read_text().strip()
    wrong = secrets.token_hex(32)
    none = ClientSecurity()
    with EmbeddingClient(target, security=none) as c:
        assert c.health() == "SERVING"  # probes carry no token
        assert c.health("userembed.v1.UserEmbeddingService") == "SERVING"
        code, details = _code(lambda: c.get("1"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in details
        code, details = _code(lambda: c.batch_get(["1", "2"]))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert _code(c.list_models)[0] == grpc.StatusCode.UNAUTHENTICATED
        # another scheme, or a bearer without a token, is malformed
        for value in (f"Basic {token}", "Bearer ", token):
            md = (("authorization", value),)
            code, details = _code(
                lambda md=md: c.stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10)
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED and "malformed" in details, value
    wrong_file = token_file.parent / "wrong"
    wrong_file.write_text(wrong)
    with EmbeddingClient(target, security=ClientSecurity(token_file=str(wrong_file))) as c:
        code, details = _code(lambda: c.get("1"))
        assert code == grpc.StatusCode.UNAUTHENTICATED and details == "invalid bearer token"
    with EmbeddingClient(target, security=ClientSecurity(token_file=str(token_file))) as c:
        assert c.get("1").source == "computed"
        assert [r.source for r in c.batch_get(["1", "2"])] == ["stored", "computed"]
        assert c.list_models().default_model
    # reflection describes the API to callers only
    with pytest.raises(grpc.RpcError) as ei:
        _reflect(target)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "userembed.v1.UserEmbeddingService" in _reflect(
        target, (("authorization", f"Bearer {token}"),)
    )
    refused = srv.metrics.registry.get_sample_value(
        "userembed_requests_total", {"method": "GetUserEmbedding", "code": "UNAUTHENTICATED"}
    )
    assert refused == 2
    assert token not in caplog.text and wrong not in caplog.text


def test_rotated_token_file_applies_without_restart(start_server, v1, token_file, caplog):
    srv = start_server(auth_token_file=str(token_file), reload_interval_s=0.1)
    target = f"127.0.0.1:{srv.port}"
    old = token_file.read_text().strip()
    new = secrets.token_hex(32)
    new_file = token_file.parent / "new"
    new_file.write_text(new)
    old_file = token_file.parent / "old"
    old_file.write_text(old)
    with (
        EmbeddingClient(target, security=ClientSecurity(token_file=str(old_file))) as old_c,
        EmbeddingClient(target, security=ClientSecurity(token_file=str(new_file))) as new_c,
    ):
        assert old_c.list_models().default_model
        token_file.write_text(f"{old}\n{new}\n")  # rotation: both, then the new one only
        _wait_until(lambda: _ok(new_c))
        assert _ok(old_c)
        token_file.write_text(new + "\n")
        _wait_until(lambda: not _ok(old_c))
        token_file.write_text("")  # an empty file (a Secret mid-update) keeps the last tokens
        _wait_until(lambda: "keeping the 1 token(s) read before" in caplog.text)
        assert _ok(new_c) and not _ok(old_c)
    assert old not in caplog.text and new not in caplog.text


def _ok(c: EmbeddingClient) -> bool:
    try:
        c.list_models()
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        return False
    return True


def _wait_until(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout  # a guard against hanging, not a timing assertion
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "content,problem",
    [
        (None, "No such file"),
        ("", "no token in the file"),
        ("\n\n", "no token in the file"),
        ("REPLACE-ME with: openssl rand -hex 32\n", "line 1 is not a token"),
        ("\ns3cr3t\n", "line 2 is not a token"),
    ],
)
def test_server_refuses_to_start_with_an_unusable_token_file(
    settings_for, features, tmp_path, content, problem
):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SettingsError, match=problem) as ei:
        EmbeddingServer(settings_for(auth_token_file=str(path)), features=features)
    if content and content.strip():
        assert content.strip().split()[0] not in str(ei.value)  # never quotes the token line


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(start_server, v1, pki):
    srv = start_server(
        tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    )
    target = f"localhost:{srv.port}"
    refused = [
        ClientSecurity(),  # plaintext
        ClientSecurity(tls_ca=pki["ca"]),  # TLS, no client certificate
        ClientSecurity(
            tls_ca=pki["ca"], tls_cert=pki["stranger_cert"], tls_key=pki["stranger_key"]
        ),
    ]
    for security in refused:
        with EmbeddingClient(target, timeout_s=5, security=security) as c:
            for call in (c.health, lambda c=c: c.get("1")):
                code, _ = _code(call)
                assert code == grpc.StatusCode.UNAVAILABLE, security
    ok = ClientSecurity(tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"])
    with EmbeddingClient(target, security=ok) as c:
        assert c.health() == "SERVING"
        assert c.get("1").source == "computed"
    # an IP target: the server name to check comes from tls_server_name (probes, port-forwards)
    by_ip = ClientSecurity(
        tls_ca=pki["ca"],
        tls_cert=pki["client_cert"],
        tls_key=pki["client_key"],
        tls_server_name="localhost",
    )
    with EmbeddingClient(f"127.0.0.1:{srv.port}", security=by_ip) as c:
        assert c.get("1").source == "stored"


def test_cli_speaks_tls_with_a_token_and_health_needs_no_token(
    start_server, v1, token_file, pki, capsys, monkeypatch
):
    srv = start_server(
        tls_cert=pki["server_cert"], tls_key=pki["server_key"], auth_token_file=str(token_file)
    )
    target = f"localhost:{srv.port}"
    tls = ["--target", target, "--tls-ca", pki["ca"]]
    assert main(["embed", "--user-id", "3", *tls, "--token-file", str(token_file)]) == 0
    assert "user 3: computed vector" in capsys.readouterr().out
    assert main(["health", *tls]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["embed", "--user-id", "3", *tls]) == 2
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED: missing bearer token" in err and "--token-file" in err
    # plaintext against a TLS port, or a CA that did not sign the server: one line, exit 1
    assert main(["health", "--target", target]) == 1
    assert "may serve TLS (--tls-ca)" in capsys.readouterr().err
    assert main(["health", "--target", target, "--tls-ca", pki["other_ca"]]) == 1
    assert "TLS handshake" in capsys.readouterr().err
    # the environment carries the same settings (compose, Kubernetes, probes)
    monkeypatch.setenv("USEREMBED_TLS_CA", pki["ca"])
    monkeypatch.setenv("USEREMBED_TOKEN_FILE", str(token_file))
    capsys.readouterr()
    assert main(["models", "--target", target]) == 0
    assert '"default_model"' in capsys.readouterr().out
    assert token_file.read_text().strip() not in capsys.readouterr().err


def test_cli_health_and_embed_with_mutual_tls(start_server, v1, pki, capsys):
    srv = start_server(
        tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    )
    tls = ["--target", f"127.0.0.1:{srv.port}", "--tls-ca", pki["ca"]]
    tls += ["--tls-server-name", "localhost"]
    assert main(["health", *tls]) == 1
    assert "want a client certificate" in capsys.readouterr().err
    cert = ["--tls-client-cert", pki["client_cert"], "--tls-client-key", pki["client_key"]]
    assert main(["health", *tls, *cert]) == 0
    assert main(["embed", "--user-id", "4", *tls, *cert]) == 0
    assert "user 4: computed vector" in capsys.readouterr().out


def test_settings_refuse_mutual_tls_without_tls_and_a_negative_cap():
    from embed_server.settings import load_settings

    with pytest.raises(SettingsError, match="tls_client_ca needs tls_cert"):
        load_settings(env={}, tls_client_ca="/ca.pem")
    with pytest.raises(SettingsError, match="max_concurrent_rpcs"):
        load_settings(env={"USEREMBED_MAX_CONCURRENT_RPCS": "-1"})
    s = load_settings(env={"USEREMBED_AUTH_TOKEN_FILE": "/t", "USEREMBED_TLS_CLIENT_CA": ""})
    assert (s.auth_token_file, s.max_concurrent_rpcs) == ("/t", 512)

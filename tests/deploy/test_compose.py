"""docker-compose.yml: valid for Compose, and the services start in the pipeline's order."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.deploy import sources

# Debian's docker-compose 1.29.2 validates a file without a Docker engine (shared/STACK.md).
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_docker_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose is not installed (Debian: apt-get install -y docker-compose)",
)


def _config(*args: str) -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE is not None
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", str(sources.COMPOSE), *args, "config"],
        capture_output=True,
        text=True,
        cwd=sources.ROOT,
        timeout=60,
    )


@needs_docker_compose
def test_docker_compose_accepts_the_file() -> None:
    proc = _config()
    assert proc.returncode == 0, proc.stderr
    rendered = yaml.safe_load(proc.stdout)
    assert set(rendered["services"]) == {
        "redis",
        "init",
        "train",
        "server",
        "refresh",
        "client",
        "server-gpu",
    }
    # Compose renders its interpolation defaults: every value is concrete.
    assert "${" not in proc.stdout


@needs_docker_compose
def test_docker_compose_accepts_the_gpu_profile() -> None:
    proc = _config("--profile", "gpu")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert "server-gpu" in services
    devices = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


@needs_docker_compose
def test_docker_compose_rejects_a_broken_file(tmp_path) -> None:
    """The validator is real: an unknown key in a service fails (so the passes above count)."""
    data = sources.compose()
    data["services"]["server"]["healthcheck"]["tset"] = ["CMD", "true"]
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [DOCKER_COMPOSE, "-f", str(bad), "config"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "tset" in proc.stderr


def _depends(service: dict) -> dict[str, str]:
    return {name: spec["condition"] for name, spec in service.get("depends_on", {}).items()}


def test_services_start_in_pipeline_order() -> None:
    s = sources.compose()["services"]
    assert _depends(s["init"]) == {"redis": "service_healthy"}
    assert _depends(s["train"]) == {"init": "service_completed_successfully"}
    for server in ("server", "server-gpu"):
        assert _depends(s[server]) == {
            "redis": "service_healthy",
            "train": "service_completed_successfully",
        }
    assert _depends(s["refresh"]) == {"server": "service_healthy"}
    assert _depends(s["client"]) == {"refresh": "service_completed_successfully"}
    # Each `service_healthy` dependency has a healthcheck to become healthy with.
    for svc in s.values():
        for dep, condition in _depends(svc).items():
            if condition == "service_healthy":
                assert "healthcheck" in s[dep], dep
    # One-shot steps must not restart after exiting 0.
    for one_shot in ("init", "train", "refresh", "client"):
        assert s[one_shot].get("restart") == "no", one_shot


def test_only_the_gpu_server_is_in_a_profile() -> None:
    s = sources.compose()["services"]
    assert {n: svc["profiles"] for n, svc in s.items() if "profiles" in svc} == {
        "server-gpu": ["gpu"]
    }
    gpu_ports = {str(p).rsplit(":", 1)[0] for p in s["server-gpu"]["ports"]}
    cpu_ports = {str(p).rsplit(":", 1)[0] for p in s["server"]["ports"]}
    assert not gpu_ports & cpu_ports, "both servers run together under --profile gpu"


def test_every_userembed_service_shares_the_workspace_volume() -> None:
    """Only the training steps write it; the server and the refresh read it (docs/deploy.md)."""
    data = sources.compose()
    assert "workspace" in data["volumes"]
    writers = {"init", "train"}
    for name, svc in data["services"].items():
        if name in {"redis", "client"}:  # the client only calls the server over gRPC
            continue
        mount = "workspace:/workspace" if name in writers else "workspace:/workspace:ro"
        assert mount in svc["volumes"], name
        assert svc["environment"]["USEREMBED_HOME"] == "/workspace", name


def test_the_refresh_writes_the_similar_volume_that_the_servers_read() -> None:
    """The refresh is the one writer of the similar-users indexes (docs/deploy.md); the servers
    load them from the same root, read only."""
    data = sources.compose()
    assert "similar" in data["volumes"]
    expected = {
        "refresh": "similar:/similar",
        "server": "similar:/similar:ro",
        "server-gpu": "similar:/similar:ro",
    }
    for name, svc in data["services"].items():
        mounts = [v for v in svc.get("volumes", []) if v.split(":")[0] == "similar"]
        assert mounts == ([expected[name]] if name in expected else []), name
        if name in expected:
            assert svc["environment"]["USEREMBED_SIMILAR_ROOT"] == "/similar", name


def test_services_use_the_image_their_dockerfile_builds() -> None:
    """Training steps run the trainer image; serving steps the torch-free server image."""
    images = sources.dockerfile_images()
    s = sources.compose()["services"]
    for name in ("init", "train"):
        assert images[s[name]["image"]] == "trainer", name
    for name in ("server", "server-gpu", "refresh", "client"):
        assert images[s[name]["image"]] == "server", name
    for svc in s.values():
        if "build" in svc:
            assert (sources.ROOT / svc["build"]["dockerfile"]).is_file()


def _host_ip(port: str) -> str:
    """The host address of a published port ("127.0.0.1:50051:50051[/tcp]"; none: every one)."""
    parts = sources.expand(port, {}).split("/")[0].split(":")
    return parts[0] if len(parts) == 3 else "0.0.0.0"


def test_published_ports_listen_on_loopback_only() -> None:
    """The compose server takes calls without a token: only this host may reach it."""
    services = sources.compose()["services"]
    published = {n: svc["ports"] for n, svc in services.items() if "ports" in svc}
    assert set(published) == {"server", "server-gpu"}
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str), f"{name}: {port!r} (the short syntax names the host IP)"
            assert _host_ip(port) == "127.0.0.1", f"{name}: {port}"


@needs_docker_compose
def test_compose_renders_loopback_bindings() -> None:
    proc = _config("--profile", "gpu")
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    ports = [p for svc in services.values() for p in svc.get("ports", [])]
    assert len(ports) == 4
    assert all(_host_ip(str(p)) == "127.0.0.1" for p in ports), ports

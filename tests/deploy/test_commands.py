"""Every command the deployment files run exists in the CLI with those flags, and the settings,
ports and environment variable names they use are the ones the code reads."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from embed_server.settings import ENV_PREFIX, ServerSettings, load_settings
from tests.deploy import sources
from tests.deploy.cli_check import CLI, TORCHRUN, parse_error, torchrun_split
from tests.output import last_json

ALL_COMMANDS = (
    sources.compose_commands()
    + sources.dockerfile_commands("trainer")
    + sources.dockerfile_commands("server")
    + sources.k8s_commands()
    + sources.native_commands()
)


def _named(commands, programs):
    return [
        (c.where, argv)
        for c in commands
        for argv in sources.commands_named([list(c.argv)], programs)
    ]


CLI_COMMANDS = _named(ALL_COMMANDS, {CLI})
TORCHRUN_COMMANDS = _named(ALL_COMMANDS, {TORCHRUN})


def _subcommand(argv: list[str]) -> str:
    """'data build', 'serve', ...: the leading words before the first option."""
    words = []
    for w in argv[1:]:
        if w.startswith("-"):
            break
        words.append(w)
    if words[:1] in (["data"], ["feast"], ["registry"]):
        return " ".join(words[:2])
    return words[0] if words else ""


@pytest.mark.parametrize(
    "where,argv", CLI_COMMANDS, ids=[f"{w}: {' '.join(a[1:3])}" for w, a in CLI_COMMANDS]
)
def test_deploy_command_parses_with_the_real_cli(where: str, argv: list[str]) -> None:
    assert "$" not in " ".join(argv), f"{where}: unexpanded variable in {argv}"
    err = parse_error(argv[1:])
    assert err is None, f"{where}: `{' '.join(argv)}` is rejected by the CLI: {err}"


@pytest.mark.parametrize("where,argv", TORCHRUN_COMMANDS, ids=[w for w, _ in TORCHRUN_COMMANDS])
def test_torchrun_commands_launch_the_cli_module_with_valid_flags(
    where: str, argv: list[str]
) -> None:
    pytest.importorskip("torch")
    args, script = torchrun_split(argv)
    assert args.module, f"{where}: torchrun must run the CLI as a module (-m userembed.commands)"
    assert script[0] == "userembed.commands", where
    assert args.nproc_per_node not in ("1", 1), f"{where}: one process per node is not torchrun"
    err = parse_error(script[1:])
    assert err is None, f"{where}: `{' '.join(script)}` is rejected by the CLI: {err}"


def _source(where: str) -> str:
    if where.startswith("docker-compose.yml"):
        return "compose"
    if where.startswith("deploy/k8s"):
        return "k8s"
    if where.startswith("deploy/native"):
        return "native"
    return where.split(" ")[0]  # server.Dockerfile, trainer.Dockerfile


def test_every_deployment_runs_the_whole_pipeline() -> None:
    """The extractors found the steps in each deployment (guards the tests above)."""
    pipeline = {"data build", "feast apply", "feast materialize", "train", "export", "serve"}
    by_source: dict[str, set[str]] = {}
    for where, argv in CLI_COMMANDS:
        by_source.setdefault(_source(where), set()).add(_subcommand(argv))
    assert pipeline | {"health", "refresh", "embed"} <= by_source["compose"]
    assert pipeline | {"health", "refresh", "embed"} <= by_source["native"]
    assert pipeline | {"refresh"} <= by_source["k8s"]
    assert {"serve", "health"} <= by_source["server.Dockerfile"]
    assert [_source(w) for w, _ in TORCHRUN_COMMANDS] == ["k8s"]


def _server_image_commands() -> list[tuple[str, list[str]]]:
    """Commands run in the server image (it has no torch)."""
    server_images = {img for img, key in sources.dockerfile_images().items() if key == "server"} | {
        "userembed-server"
    }
    out = [(c.where, list(c.argv)) for c in sources.dockerfile_commands("server")]
    for name, svc in sources.compose()["services"].items():
        if svc.get("image") in server_images:
            out += [(w, a) for w, a in CLI_COMMANDS if w.startswith(f"docker-compose.yml: {name} ")]
    for path, doc in sources.k8s_documents():
        spec = sources.pod_spec(doc)
        if spec and any(c["image"] in server_images for c in spec["containers"]):
            rel = str(path.relative_to(sources.ROOT))
            out += [(w, a) for w, a in CLI_COMMANDS if w.startswith(rel)]
    return [(w, a) for w, a in out if a[0] == CLI]


def test_server_image_commands_parse_without_torch() -> None:
    """The server image has no torch: its commands must not import it, even to parse."""
    commands = _server_image_commands()
    assert {a[1] for _, a in commands} >= {"serve", "health", "refresh", "embed"}
    code = r"""
import importlib.abc, json, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "torchrec", "fbgemm_gpu"}:
            raise ModuleNotFoundError(f"No module named {name!r} (server image)", name=name)
sys.meta_path.insert(0, NoTorch())
from tests.deploy.cli_check import parse_error
bad = {}
for where, argv in json.load(sys.stdin):
    err = parse_error(argv[1:])
    if err:
        bad[where + ": " + " ".join(argv)] = err
import embed_server.server, refresh.job  # what serve / refresh run
print(json.dumps({"bad": bad, "torch": [m for m in sys.modules if m.startswith("torch")]}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(commands),
        capture_output=True,
        text=True,
        cwd=sources.ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["bad"] == {}
    assert result["torch"] == []


# --- environment variables, settings and ports ----------------------------------------------

SETTINGS_VARS = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServerSettings)}


def _variables_read_by_the_code() -> set[str]:
    names = set(SETTINGS_VARS) | {"REDIS_URL"}
    for pkg in ("userembed", "trainer", "embed_server", "refresh"):
        for path in (sources.ROOT / pkg).rglob("*.py"):
            names |= set(re.findall(r"[\"'](USEREMBED_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def _deploy_environments() -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, svc in sources.compose()["services"].items():
        out[f"docker-compose.yml: {name}"] = {
            k: str(v) for k, v in (svc.get("environment") or {}).items()
        }
    for key in sources.DOCKERFILES:
        out[f"{key}.Dockerfile"] = sources.dockerfile_env(
            sources.final_stage(sources.dockerfile(sources.DOCKERFILES[key]))
        )
    docs = sources.k8s_documents()
    configmaps = {
        d["metadata"]["name"]: {k: str(v) for k, v in d.get("data", {}).items()}
        for _, d in docs
        if d.get("kind") == "ConfigMap"
    }
    for path, doc in docs:
        spec = sources.pod_spec(doc)
        for c in (spec or {}).get("containers", []):
            env = sources.container_env(c, configmaps)
            env |= {e["name"]: "" for e in c.get("env", []) if "valueFrom" in e}
            out[f"{path.relative_to(sources.ROOT)}: {c['name']}"] = env
    return out


def test_environment_variable_names_are_read_by_the_code() -> None:
    known = _variables_read_by_the_code()
    unknown = {
        where: sorted(k for k in env if k.startswith("USEREMBED_") and k not in known)
        for where, env in _deploy_environments().items()
    }
    assert {w: u for w, u in unknown.items() if u} == {}


def test_every_userembed_container_gets_redis_url_and_the_workspace() -> None:
    for where, env in _deploy_environments().items():
        if where.endswith(": redis") or where.endswith(".Dockerfile"):
            continue
        assert "REDIS_URL" in env, where
        assert env.get("USEREMBED_HOME") == "/workspace", where


def test_compose_server_ports_match_its_settings() -> None:
    services = sources.compose()["services"]
    for name in ("server", "server-gpu"):
        settings = load_settings(env=_deploy_environments()[f"docker-compose.yml: {name}"])
        assert settings.host == "0.0.0.0", f"{name}: must listen on every interface"
        published = {int(str(p).rsplit(":", 1)[1]) for p in services[name]["ports"]}
        assert published == {settings.grpc_port, settings.metrics_port}
        health = next(a for w, a in CLI_COMMANDS if w == f"docker-compose.yml: {name} healthcheck")
        assert health[1] == "health"
        assert health[health.index("--target") + 1] == f"127.0.0.1:{settings.grpc_port}"


def test_server_image_exposes_and_checks_its_settings_ports() -> None:
    ins = sources.final_stage(sources.dockerfile(sources.DOCKERFILES["server"]))
    settings = load_settings(env=sources.dockerfile_env(ins))
    assert settings.host == "0.0.0.0"
    exposed = {int(p) for i in ins if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {settings.grpc_port, settings.metrics_port}
    health = next(c.argv for c in sources.dockerfile_commands("server") if "HEALTHCHECK" in c.where)
    assert health[health.index("--target") + 1] == f"127.0.0.1:{settings.grpc_port}"


def test_k8s_server_ports_and_probes_match_its_settings() -> None:
    docs = sources.k8s_documents()
    deployment = next(d for _, d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    configmaps = {d["metadata"]["name"]: d["data"] for _, d in docs if d["kind"] == "ConfigMap"}
    settings = load_settings(env=sources.container_env(container, configmaps))
    assert settings.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "metrics": settings.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.grpc_port, probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == settings.metrics_port

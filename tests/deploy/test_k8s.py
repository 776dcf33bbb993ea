"""Kubernetes manifests: they parse, have the fields the API server requires, and hang together
(selectors, ports, probes, references to ConfigMaps, Secrets and volumes)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy import sources

API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "CronJob": "batch/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}

DOCS = sources.k8s_documents()


def _docs(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d["kind"] == kind]


def _one(kind: str, name: str) -> dict:
    found = [d for d in _docs(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pods() -> list[tuple[str, dict, dict]]:
    """(kind/name, pod template metadata, pod spec) of every workload."""
    out = []
    for _, d in DOCS:
        spec = sources.pod_spec(d)
        if spec is None:
            continue
        template = (
            d["spec"]["jobTemplate"]["spec"]["template"]
            if d["kind"] == "CronJob"
            else d["spec"]["template"]
        )
        out.append((f"{d['kind']}/{d['metadata']['name']}", template["metadata"], spec))
    return out


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_manifests_have_kind_api_version_and_name() -> None:
    assert len(DOCS) >= 12
    kinds = {d["kind"] for _, d in DOCS}
    assert kinds == set(API_VERSIONS)
    for path, d in DOCS:
        where = f"{path.name}: {d.get('kind')}"
        assert d["apiVersion"] == API_VERSIONS[d["kind"]], where
        assert d["metadata"]["name"], where
        assert "spec" in d or d["kind"] in {"ConfigMap", "Secret", "Namespace"}, where


def test_every_resource_file_is_in_a_kustomization() -> None:
    listed = set(sources.k8s_resource_files())
    patches = set()
    for kfile in sources.kustomization_files():
        k = yaml.safe_load(kfile.read_text())
        assert k["kind"] == "Kustomization" and k["apiVersion"].startswith("kustomize.config"), (
            kfile
        )
        for res in k.get("resources", []):
            assert (kfile.parent / res).exists(), f"{kfile}: missing resource {res}"
        for patch in k.get("patches", []):
            assert (kfile.parent / patch["path"]).is_file(), f"{kfile}: missing patch"
            patches.add((kfile.parent / patch["path"]).resolve())
    on_disk = {p.resolve() for p in sources.K8S.rglob("*.yaml")} - set(
        p.resolve() for p in sources.kustomization_files()
    )
    assert on_disk - listed - patches == set()


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)
@pytest.mark.parametrize("kustomization", sources.K8S_KUSTOMIZATIONS)
def test_kustomize_builds(kustomization: str) -> None:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(sources.K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert built and all(
        d["metadata"].get("namespace") == "userembed" for d in built if d["kind"] != "Namespace"
    )
    if kustomization == "overlays/gpu":
        server = next(d for d in built if d["kind"] == "Deployment")
        c = server["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["readinessProbe"]["grpc"]["port"] == 50051, "the patch kept the probes"


def test_server_deployment_selects_its_pods_and_probes_grpc_health() -> None:
    dep = _one("Deployment", "userembed-server")
    template = dep["spec"]["template"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector and _matches(selector, template["metadata"]["labels"])
    (container,) = template["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" in container[probe], f"{probe}: a native grpc probe"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The drain (settings.drain_grace_s) plus the preStop pause fit in the grace period.
    cm = _one("ConfigMap", "userembed-config")["data"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert (
        template["spec"]["terminationGracePeriodSeconds"]
        > float(cm["USEREMBED_DRAIN_GRACE_S"]) + pre_stop
    )


def test_service_hpa_and_pdb_target_the_server_pods() -> None:
    dep = _one("Deployment", "userembed-server")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    svc = _one("Service", "userembed-server")
    assert _matches(svc["spec"]["selector"], labels)
    for port in svc["spec"]["ports"]:
        target = port["targetPort"]
        assert target in port_names or target in port_names.values(), port
    assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}
    hpa = _one("HorizontalPodAutoscaler", "userembed-server")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == (
        "Deployment",
        "userembed-server",
        "apps/v1",
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = _one("PodDisruptionBudget", "userembed-server")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    # A PDB that allows no disruption at the HPA's minimum would block node drains.
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_every_container_requests_and_limits_cpu_and_memory() -> None:
    for where, _, spec in _pods():
        for c in spec["containers"] + spec.get("initContainers", []):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {kind}"


def test_references_point_at_objects_in_the_manifests() -> None:
    configmaps = {d["metadata"]["name"] for d in _docs("ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in _docs("Secret")}
    claims = {d["metadata"]["name"] for d in _docs("PersistentVolumeClaim")}
    for where, _, spec in _pods():
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, where
        mounts = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            assert {m["name"] for m in c.get("volumeMounts", [])} <= mounts, where
            for ref in c.get("envFrom", []):
                assert ref["configMapRef"]["name"] in configmaps, where
            for e in c.get("env", []):
                key_ref = e.get("valueFrom", {}).get("secretKeyRef")
                if key_ref:
                    assert key_ref["key"] in secrets[key_ref["name"]]["stringData"], where


def test_refresh_cronjob_forbids_overlap_and_retries() -> None:
    cron = _one("CronJob", "userembed-refresh")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] >= 1
    assert job["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}


def test_single_node_training_builds_features_then_runs_several_processes() -> None:
    job = _one("Job", "userembed-train")
    pod = job["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    steps = [a[1:3] for a in sources.container_argv(init["command"], {})]
    assert steps == [["data", "build"], ["feast", "apply"], ["feast", "materialize"]]
    (c,) = pod["containers"]
    (train,) = [
        a for a in sources.container_argv(c["command"], {}) if a[:2] == ["userembed", "train"]
    ]
    assert int(train[train.index("--nproc") + 1]) > 1
    # torchrun workers share tensors through /dev/shm: a memory-backed volume, not 64 MiB.
    shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm


def test_multi_node_training_master_is_pod_zero_which_exports() -> None:
    job = _one("Job", "userembed-train-mn")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    svc = _one("Service", pod["subdomain"])
    assert svc["spec"]["clusterIP"] == "None"
    # The Job controller labels its pods with batch.kubernetes.io/job-name.
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    # Indexed Job pods are named <job>-<index>: the master is pod 0 through the headless Service.
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(env["MASTER_PORT"]) in {p["port"] for p in svc["spec"]["ports"]}
    assert int(env["NNODES"]) == spec["completions"]
    pytest.importorskip("torch")
    from tests.deploy.cli_check import torchrun_split

    lines = sources.container_argv(c["command"], env | {"JOB_COMPLETION_INDEX": "1"})
    (torchrun,) = [a for a in lines if a and a[0] == "torchrun"]
    args, script = torchrun_split(torchrun)
    assert (args.nnodes, args.node_rank) == (env["NNODES"], 1)
    assert (args.master_addr, args.master_port) == (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
    assert script[:2] == ["userembed.commands", "train"]
    # Only pod 0, where global rank 0 wrote the model, exports it.
    script_text = c["command"][-1]
    assert re.search(r'if \[ "\$JOB_COMPLETION_INDEX" = 0 \]; then userembed export', script_text)


# --- who may call: the token Secret, mutual TLS and the probes ------------------------------


def _secret_behind(spec: dict, container: dict, path: str) -> tuple[str, str]:
    """(Secret name, key) of the file at `path`, which must come from a read-only mount of a
    whole Secret (no subPath: an updated Secret reaches the file)."""
    parent, key = path.rsplit("/", 1)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == parent]
    assert mount.get("readOnly") is True and "subPath" not in mount, mount
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume["secret"]["secretName"], key


def test_server_reads_its_grpc_token_from_a_secret_whose_placeholder_it_refuses(tmp_path) -> None:
    from embed_server.auth import read_tokens
    from embed_server.settings import SettingsError, load_settings

    dep = _one("Deployment", "userembed-server")
    spec = dep["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    cm = _one("ConfigMap", "userembed-config")["data"]
    settings = load_settings(env=sources.container_env(container, {"userembed-config": cm}))
    assert settings.auth_token_file, "the server requires a token"
    name, key = _secret_behind(spec, container, settings.auth_token_file)
    secret = _one("Secret", name)
    # The placeholder fails closed: a server started with it refuses to run.
    placeholder = tmp_path / "token"
    placeholder.write_text(secret["stringData"][key])
    with pytest.raises(SettingsError, match="is not a token"):
        read_tokens(str(placeholder))
    # Health is exempt from the token: the kubelet's native gRPC probe keeps working.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.grpc_port
    assert settings.max_concurrent_rpcs > 0


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_mtls_overlay_serves_mutual_tls_and_probes_with_userembed_health() -> None:
    from embed_server.client import ClientSecurity
    from embed_server.settings import load_settings
    from tests.deploy.cli_check import parse_error

    proc = subprocess.run(
        ["kubectl", "kustomize", str(sources.K8S / "overlays" / "mtls")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    dep = next(d for d in built if d["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    configmaps = {d["metadata"]["name"]: d["data"] for d in built if d["kind"] == "ConfigMap"}
    env = sources.container_env(container, configmaps)
    settings = load_settings(env=env)
    assert settings.tls_cert and settings.tls_key and settings.tls_client_ca
    assert settings.auth_token_file, "mutual TLS comes on top of the token"
    client = ClientSecurity.from_env(env)
    assert client.tls_ca and client.tls_cert and client.tls_key and client.tls_server_name
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca, client.tls_ca):
        assert _secret_behind(spec, container, path)[0] == "userembed-server-tls"
    for path in (client.tls_cert, client.tls_key):
        assert _secret_behind(spec, container, path)[0] == "userembed-probe-tls"
    # The kubelet's gRPC probe speaks no TLS: every probe runs the health command instead.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = container[probe]
        assert "grpc" not in p, probe
        argv = p["exec"]["command"]
        assert argv[:2] == ["userembed", "health"] and parse_error(argv[1:]) is None, argv
        assert argv[argv.index("--target") + 1] == f"127.0.0.1:{settings.grpc_port}"
        assert p["timeoutSeconds"] >= 5, f"{probe}: a Python process per run"

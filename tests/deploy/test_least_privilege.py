"""Least privilege in the deployment files (docs/deploy.md, security): only the training Jobs
write the workspace and only the refresh writes the similar-users volume, the server writes
nothing but its /tmp, every container has a read-only root file system (an emptyDir for what
must be written), RuntimeDefault seccomp and no service account token, a NetworkPolicy isolates
every workload, and the signed-models overlay hands each side only its own key."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml

from embed_server.settings import load_settings
from tests.deploy import sources
from userembed import paths

DOCS = [d for _, d in sources.k8s_documents()]
SERVER, REFRESH = "Deployment/userembed-server", "CronJob/userembed-refresh"
WORKSPACE_WRITERS = {"Job/userembed-train", "Job/userembed-train-mn"}
READ_ONLY_READERS = {SERVER, REFRESH}
# claim -> the only workloads that mount it writable
CLAIM_WRITERS = {"userembed-workspace": WORKSPACE_WRITERS, "userembed-similar": {REFRESH}}
REDIS = {"app.kubernetes.io/name": "redis"}
DNS_PORT, REDIS_PORT = 53, 6379


def _workloads(docs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """kind/name -> (pod labels, pod spec) of every workload in `docs`."""
    out = {}
    for d in docs:
        spec = sources.pod_spec(d)
        if spec is None:
            continue
        tmpl = d["spec"]["jobTemplate"]["spec"] if d["kind"] == "CronJob" else d["spec"]
        labels = dict(tmpl["template"]["metadata"].get("labels", {}))
        if d["kind"] == "Job":  # the Job controller adds this label to its pods
            labels["batch.kubernetes.io/job-name"] = d["metadata"]["name"]
        out[f"{d['kind']}/{d['metadata']['name']}"] = (labels, spec)
    return out


WORKLOADS = _workloads(DOCS)
POLICIES = [d for d in DOCS if d["kind"] == "NetworkPolicy"]


def _containers(spec: dict) -> list[dict]:
    return spec["containers"] + spec.get("initContainers", [])


def _volumes(spec: dict) -> dict[str, dict]:
    return {v["name"]: v for v in spec.get("volumes", [])}


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_the_workloads_are_the_ones_these_rules_name() -> None:
    assert set(WORKLOADS) == WORKSPACE_WRITERS | READ_ONLY_READERS


def test_every_pod_has_runtime_default_seccomp_and_no_service_account_token() -> None:
    for where, (_, spec) in WORKLOADS.items():
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where


def test_every_container_has_a_read_only_root_and_a_tmp_emptydir() -> None:
    for where, (_, spec) in WORKLOADS.items():
        volumes = _volumes(spec)
        for c in _containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert volumes[tmp["name"]]["emptyDir"]["sizeLimit"], (where, c["name"])


def _claim_writers(workloads: dict[str, tuple[dict, dict]]) -> dict[str, set[str]]:
    """claim -> the workloads that mount it writable; a read-only mount must come with a
    read-only claim (no container of the pod can remount it)."""
    writers: dict[str, set[str]] = {}
    for where, (_, spec) in workloads.items():
        volumes = _volumes(spec)
        for c in _containers(spec):
            for m in c["volumeMounts"]:
                claim = volumes[m["name"]].get("persistentVolumeClaim")
                if claim is None:
                    continue
                writers.setdefault(claim["claimName"], set())
                if not m.get("readOnly"):
                    writers[claim["claimName"]].add(where)
                else:
                    assert claim["readOnly"] is True, (where, m["name"])
    return writers


def test_only_the_training_jobs_write_the_workspace_and_the_refresh_the_similar_volume() -> None:
    assert _claim_writers(WORKLOADS) == CLAIM_WRITERS


def _writable_mounts(spec: dict) -> set[tuple[str, str]]:
    """(mount path, what backs it: "emptyDir" or the claim name) of every writable mount."""
    volumes = _volumes(spec)
    out = set()
    for c in _containers(spec):
        for m in c["volumeMounts"]:
            if not m.get("readOnly"):
                source = volumes[m["name"]]
                claim = source.get("persistentVolumeClaim", {}).get("claimName")
                out.add((m["mountPath"], claim or next(k for k in source if k != "name")))
    return out


def test_the_server_writes_its_tmp_only_and_the_refresh_also_the_similar_volume() -> None:
    (cm,) = [d["data"] for d in DOCS if d["kind"] == "ConfigMap"]
    tmp = ("/tmp", "emptyDir")
    assert _writable_mounts(WORKLOADS[SERVER][1]) == {tmp}
    assert _writable_mounts(WORKLOADS[REFRESH][1]) == {
        tmp,
        (cm["USEREMBED_SIMILAR_ROOT"], "userembed-similar"),
    }


def test_the_similar_root_is_the_similar_volume_in_the_server_and_the_refresh(
    monkeypatch,
) -> None:
    """The server loads the indexes where the refresh writes them: the ConfigMap's root (the
    name userembed.paths reads) is where both pods mount the similar claim."""
    (cm,) = [d["data"] for d in DOCS if d["kind"] == "ConfigMap"]
    for name, value in cm.items():
        monkeypatch.setenv(name, str(value))
    root = str(paths.similar_root())
    for where in READ_ONLY_READERS:
        _, spec = WORKLOADS[where]
        volumes = _volumes(spec)
        (container,) = spec["containers"]
        assert {ref["configMapRef"]["name"] for ref in container["envFrom"]} == {"userembed-config"}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == root]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == "userembed-similar", where


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("kustomization", sources.K8S_KUSTOMIZATIONS)
def test_overlays_keep_who_writes_each_volume(kustomization: str) -> None:
    workloads = _workloads(_kustomize(kustomization))
    for claim, writers in _claim_writers(workloads).items():
        assert writers == CLAIM_WRITERS[claim] & set(workloads), (kustomization, claim)
    for where in READ_ONLY_READERS & set(workloads):
        assert _writable_mounts(workloads[where][1]) == _writable_mounts(WORKLOADS[where][1])


def test_every_workload_is_isolated_both_ways_by_a_network_policy() -> None:
    for where, (labels, _) in WORKLOADS.items():
        mine = [p for p in POLICIES if _selects(p["spec"]["podSelector"], labels)]
        assert mine, f"{where}: no NetworkPolicy selects its pods"
        types = {t for p in mine for t in p["spec"]["policyTypes"]}
        assert types == {"Ingress", "Egress"}, where


def test_only_declared_clients_reach_the_server_ports() -> None:
    labels, spec = WORKLOADS["Deployment/userembed-server"]
    (policy,) = [p for p in POLICIES if _selects(p["spec"]["podSelector"], labels)]
    (server,) = spec["containers"]
    ports = {p["name"] for p in server["ports"]}
    reached = set()
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "a rule without `from` lets every pod in"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            assert len(peer["podSelector"]["matchLabels"]) == 1, "a declared client label"
            assert next(iter(peer["podSelector"]["matchLabels"])).startswith("userembed/")
        assert rule["ports"], "a rule without ports opens every port"
        reached |= {p["port"] for p in rule["ports"]}
    assert reached == ports == {"grpc", "metrics"}
    # Jobs serve nothing: no ingress but from their own pods (multi-node rendezvous, gloo).
    for p in POLICIES:
        if p is policy:
            continue
        for rule in p["spec"].get("ingress", []):
            assert rule["from"] == [{"podSelector": p["spec"]["podSelector"]}], p["metadata"]


def test_pods_reach_only_redis_dns_and_their_own_job() -> None:
    for p in POLICIES:
        for rule in p["spec"]["egress"]:
            assert rule["to"], f"{p['metadata']['name']}: a rule without `to` reaches anything"
            for peer in rule["to"]:
                assert "ipBlock" not in peer, p["metadata"]["name"]
                selector = peer["podSelector"]
                ports = {(x["port"], x["protocol"]) for x in rule.get("ports", [])}
                if selector.get("matchLabels") == REDIS:
                    assert ports == {(REDIS_PORT, "TCP")} and "namespaceSelector" not in peer
                elif selector.get("matchLabels") == {"k8s-app": "kube-dns"}:
                    assert ports == {(DNS_PORT, "UDP"), (DNS_PORT, "TCP")}
                else:  # the pods of the same Job (the policy's own selector)
                    assert peer == {"podSelector": p["spec"]["podSelector"]}, p["metadata"]


def _kustomize(kustomization: str) -> list[dict]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(sources.K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _secret_file(spec: dict, container: dict, env_name: str) -> tuple[str, str]:
    """(Secret name, key) behind the file that `env_name` points at, via a read-only mount."""
    value = next(e["value"] for e in container["env"] if e["name"] == env_name)
    path = PurePosixPath(value)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount["readOnly"] is True
    return _volumes(spec)[mount["name"]]["secret"]["secretName"], path.name


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_signed_models_overlay_gives_the_signing_key_to_the_trainer_only(monkeypatch) -> None:
    workloads = _workloads(_kustomize("overlays/signed-models"))
    seen = {}
    for where, (_, spec) in workloads.items():
        for c in _containers(spec):
            env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
            for name in ("USEREMBED_MODEL_VERIFY_KEY", "USEREMBED_MODEL_SIGNING_KEY"):
                if name in env:
                    seen[(where, name)] = _secret_file(spec, c, name)
                    # The names are the ones the code reads.
                    monkeypatch.setenv(name, env[name])
            if "USEREMBED_MODEL_VERIFY_KEY" in env and where.startswith("Deployment"):
                settings = load_settings(env=env)
                assert settings.model_verify_key == env["USEREMBED_MODEL_VERIFY_KEY"]
            secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
            if where != "Job/userembed-train":
                assert "userembed-model-signing" not in secrets, where
    verify = ("userembed-model-verify", "verify.pem")
    assert seen == {
        ("Deployment/userembed-server", "USEREMBED_MODEL_VERIFY_KEY"): verify,
        ("CronJob/userembed-refresh", "USEREMBED_MODEL_VERIFY_KEY"): verify,
        ("Job/userembed-train", "USEREMBED_MODEL_SIGNING_KEY"): (
            "userembed-model-signing",
            "signing.pem",
        ),
    }
    assert paths.model_verify_key() and paths.model_signing_key()


def test_compose_containers_are_hardened_and_write_only_their_own_volume() -> None:
    """Training writes the workspace, the refresh the similar volume, the rest nothing."""
    services = sources.compose()["services"]
    writes = {"init": "workspace", "train": "workspace", "refresh": "similar"}
    for name, svc in services.items():
        if name == "redis":
            continue
        assert svc["read_only"] is True, name
        assert "/tmp" in svc["tmpfs"], name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        writable = [v.split(":")[0] for v in svc.get("volumes", []) if not v.endswith(":ro")]
        assert writable == ([writes[name]] if name in writes else []), name

"""The container images: what they install (from pyproject.toml pins), who they run as, and that
their build context holds what they COPY."""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy import sources

sys.path.insert(0, str(sources.DOCKER))
import requirements as image_requirements  # noqa: E402  (deploy/docker/requirements.py)

PYPROJECT = tomllib.loads((sources.ROOT / "pyproject.toml").read_text())
TORCH_DISTS = {"torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchvision", "torchaudio"}


def _requirements_calls(name: str) -> list[list[str]]:
    """Arguments of each `requirements.py ...` call in the Dockerfile's RUN instructions."""
    calls = []
    for ins in sources.dockerfile(sources.DOCKERFILES[name]):
        if ins.keyword != "RUN":
            continue
        for m in re.finditer(r"requirements\.py([^|>&;)]*)", ins.args):
            calls.append(shlex.split(m.group(1)))
    return calls


def _image_requirements(name: str) -> list[str]:
    """The requirement lines the image installs with `pip install -r` (not the dev tool)."""
    (args,) = [a for a in _requirements_calls(name) if "dev" not in a]
    extras = [a for a in args if not a.startswith("--") and "=" not in a]
    swaps = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--swap")
    return image_requirements.requirements(PYPROJECT, extras, swaps)


def _dist(line: str) -> str:
    return image_requirements.dist_name(line)


def test_server_image_has_onnxruntime_gpu_and_no_torch() -> None:
    lines = _image_requirements("server")
    dists = {_dist(line) for line in lines}
    assert "onnxruntime-gpu" in dists
    assert "onnxruntime" not in dists, "onnxruntime and onnxruntime-gpu are the same module"
    assert not dists & TORCH_DISTS
    # The GPU build keeps the CPU pin's version.
    (ort,) = [line for line in lines if _dist(line) == "onnxruntime-gpu"]
    cpu_pin = next(
        r
        for r in PYPROJECT["project"]["optional-dependencies"]["serve"]
        if _dist(r) == "onnxruntime"
    )
    assert ort.split("==")[1] == cpu_pin.split("==")[1]
    # Serving and refresh both run from this image.
    assert {"grpcio-health-checking", "prometheus-client", "ray"} <= dists


def test_server_image_checks_its_contract_at_build_time() -> None:
    runs = " ".join(
        i.args for i in sources.dockerfile(sources.DOCKERFILES["server"]) if i.keyword == "RUN"
    )
    assert "! pip show torch" in runs and "! pip show onnxruntime " in runs


def test_trainer_image_installs_the_stack_of_cpu_torch_and_torchrec() -> None:
    lines = _image_requirements("trainer")
    dists = {_dist(line) for line in lines}
    assert {"torch", "fbgemm-gpu-cpu", "onnx", "onnxruntime", "feast"} <= dists
    assert "onnxruntime-gpu" not in dists
    runs = [
        i.args for i in sources.dockerfile(sources.DOCKERFILES["trainer"]) if i.keyword == "RUN"
    ]
    torch_pin = next(line for line in lines if _dist(line) == "torch")
    # torch comes first from the CPU wheel index, at the pyproject pin.
    first_torch = next(r for r in runs if "torch==" in r)
    assert "download.pytorch.org/whl/cpu" in first_torch and torch_pin in first_torch
    # torchrec without its dependencies: its metadata asks for the CUDA fbgemm-gpu.
    assert any(re.search(r"--no-deps[^&]*torchrec==1\.8\.0", r) for r in runs)


def test_requirements_refuses_unknown_extras_and_swaps() -> None:
    with pytest.raises(ValueError, match="unknown extra"):
        image_requirements.requirements(PYPROJECT, ["gpu"])
    with pytest.raises(ValueError, match="match no requirement"):
        image_requirements.requirements(PYPROJECT, ["serve"], {"onnx-runtime-typo": "x"})


@pytest.mark.parametrize("name", sorted(sources.DOCKERFILES))
def test_image_runs_as_a_non_root_user_with_python_3_11(name: str) -> None:
    ins = sources.dockerfile(sources.DOCKERFILES[name])
    final = sources.final_stage(ins)
    users = [i.args for i in final if i.keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert len({i.stage for i in ins}) >= 2, "multi-stage: build tools stay out of the image"
    text = sources.DOCKERFILES[name].read_text()
    assert "python:3.11" in text or "python3.11" in text


def _owned_by_user(name: str) -> set[str]:
    """Paths the final stage of image `name` chowns to the user it runs as."""
    final = sources.final_stage(sources.dockerfile(sources.DOCKERFILES[name]))
    user = [i.args for i in final if i.keyword == "USER"][-1]
    out: set[str] = set()
    for ins in final:
        if ins.keyword == "RUN":
            for m in re.finditer(r"chown\s+(\S+)\s+([^&;|]+)", ins.args):
                if m.group(1).split(":")[0] == user:
                    out |= set(m.group(2).split())
    return out


def test_images_own_the_mount_points_their_compose_services_write() -> None:
    """An empty named volume takes the owner of the image's folder it is mounted on: the
    non-root user must own it to write there (the workspace for training, /similar for the
    refresh)."""
    images = sources.dockerfile_images()
    writes = set()
    for name, svc in sources.compose()["services"].items():
        if "build" not in svc:
            continue
        for volume in svc.get("volumes", []):
            if not volume.endswith(":ro"):
                path = volume.split(":")[1]
                assert path in _owned_by_user(images[svc["image"]]), (name, volume)
                writes.add((name, path))
    assert writes == {("init", "/workspace"), ("train", "/workspace"), ("refresh", "/similar")}


def test_server_image_is_cuda_runtime_with_a_healthcheck() -> None:
    text = sources.DOCKERFILES["server"].read_text()
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", text).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu[\d.]+", base)
    final = sources.final_stage(sources.dockerfile(sources.DOCKERFILES["server"]))
    (health,) = [i for i in final if i.keyword == "HEALTHCHECK"]
    assert "userembed health" in health.args


# --- .dockerignore --------------------------------------------------------------------------


def _pattern(p: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(p):
        if p.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif p.startswith("**", i):
            out += ".*"
            i += 2
        elif p[i] == "*":
            out += "[^/]*"
            i += 1
        elif p[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(p[i])
            i += 1
    return re.compile(out)


def _ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, pat in rules:
        if any(pat.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (sources.ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _pattern(line.lstrip("!").strip("/"))))
    return rules


def _copy_sources(name: str) -> list[str]:
    out = []
    for ins in sources.dockerfile(sources.DOCKERFILES[name]):
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        out += words[:-1]
    return out


@pytest.mark.parametrize("name", sorted(sources.DOCKERFILES))
def test_dockerignore_lets_every_copied_file_into_the_context(name: str) -> None:
    rules = _dockerignore()
    copied = _copy_sources(name)
    assert copied
    for src in copied:
        path = sources.ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        assert files, src
        for f in files:
            rel = f.relative_to(sources.ROOT).as_posix()
            if "__pycache__" in rel or "_pb2" in rel:
                continue
            assert not _ignored(rel, rules), f"{name}: COPY {src}: {rel} is excluded"


def test_dockerignore_keeps_the_workspace_and_virtualenv_out() -> None:
    rules = _dockerignore()
    for rel in (
        ".venv/bin/python",
        "var/models/x",
        ".git/HEAD",
        "tests/conftest.py",
        "embed_server/_proto/embedding_service_pb2.py",
        "trainer/__pycache__/a.pyc",
    ):
        assert _ignored(rel, rules), rel
    assert not _ignored("embed_server/_proto/__init__.py", rules)
    assert Path(sources.ROOT / "embed_server/_proto/__init__.py").is_file()

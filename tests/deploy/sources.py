"""Read the deployment files the way their runtimes do, to check them against the code.

Command lines come out of docker-compose.yml, the Dockerfiles, the Kubernetes manifests and the
native scripts as argv lists (shell lines split like `sh` would, variables expanded from the
defaults the file itself gives), so tests can run them through the real CLI parser.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
NATIVE = ROOT / "deploy" / "native"
DOCKERFILES = {
    "trainer": DOCKER / "trainer.Dockerfile",
    "server": DOCKER / "server.Dockerfile",
}
K8S_KUSTOMIZATIONS = (
    ".",
    "base",
    "training",
    "training-multinode",
    "overlays/gpu",
    "overlays/signed-models",
    "overlays/mtls",
)

# ${NAME:-default}, ${NAME-default}, ${NAME}, $NAME
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")
# Words that end one simple command inside a shell line.
_SHELL_OPS = {"then", "else", "elif", "fi", "do", "done", "esac"}
_KEYWORDS = {"if", "while", "until", "!", "case"}
_DUP_FD = re.compile(r"\d*[<>]&\d+")
_REDIRECT = re.compile(r"^(\d*(?:>>|>|<))(.*)$")


@dataclass(frozen=True)
class Command:
    """One command line found in a deployment file."""

    where: str  # "docker-compose.yml: service train" etc., for failure messages
    argv: tuple[str, ...]  # program first ("userembed", "torchrun", ...)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Shell / compose variable expansion: env value, else the inline default, else unchanged."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if name in env:
            return env[name]
        if m.group(2) is not None:
            return expand(m.group(2), env)
        return m.group(0)

    return _VAR.sub(sub, text)


def shell_commands(
    script: str, env: Mapping[str, str], aliases: Mapping[str, str]
) -> Iterator[list[str]]:
    """Simple commands of a shell script as argv lists (after expansion and aliases).

    `aliases` maps a program word to the program it stands for (e.g. a shell function `ue`
    that runs `userembed`). Continuation lines are joined; quoted newlines stay in their word.
    Enough shell for the scripts of this repository, not a shell parser.
    """
    text = expand(script.replace("\\\n", " "), env)
    text = _DUP_FD.sub(" ", text)  # 2>&1: not words of the command
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()\n")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    skip_target = False
    for tok in [*lexer, ";"]:
        if _REDIRECT.match(tok):
            skip_target = _REDIRECT.match(tok).group(2) == ""  # type: ignore[union-attr]
            continue
        if skip_target:
            skip_target = False
            continue
        if tok in {"(", "()"} and len(words) == 1:  # `name() {`: a function definition, not a call
            words = []
            continue
        if not words and tok in {"{", "}"}:
            continue
        if (
            (tok and tok.strip(";&|()\n") == "")
            or tok in _SHELL_OPS
            or (not words and tok in _KEYWORDS)
        ):
            while words and re.match(r"^\w+=", words[0]):  # NAME=value: no program
                words = words[1:]
            if words:
                words[0] = aliases.get(words[0], words[0])
                yield words
            words = []
        else:
            words.append(tok)


def commands_named(
    cmds: Iterator[list[str]] | list[list[str]], programs: set[str]
) -> list[list[str]]:
    """The argv lists whose program (after `nohup`, `exec`) is in `programs`."""
    out = []
    for argv in cmds:
        while argv and argv[0] in {"nohup", "exec", "command"}:
            argv = argv[1:]
        if "$@" in argv:  # a wrapper function's body: passes its own arguments on
            continue
        if argv and Path(argv[0]).name in programs:
            out.append([Path(argv[0]).name, *argv[1:]])
    return out


def container_argv(command: list[str] | str, env: Mapping[str, str]) -> list[list[str]]:
    """A container command (exec form list, `sh -c SCRIPT`, or a string) as argv lists."""
    if isinstance(command, str):
        return list(shell_commands(command, env, {}))
    if len(command) >= 3 and command[0] in {"sh", "bash", "/bin/sh", "/bin/bash"}:
        flags = command[1]
        if flags.startswith("-") and "c" in flags:
            return list(shell_commands(command[2], env, {}))
    return [[expand(w, env) for w in command]]


# --- docker-compose.yml ---------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_commands() -> list[Command]:
    out = []
    for name, svc in compose()["services"].items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        pieces = []
        if "command" in svc:
            pieces.append(("command", svc["command"]))
        test = (svc.get("healthcheck") or {}).get("test")
        if test:
            if test[0] == "CMD":
                pieces.append(("healthcheck", test[1:]))
            elif test[0] == "CMD-SHELL":
                pieces.append(("healthcheck", test[1]))
        for what, command in pieces:
            for argv in container_argv(command, env):
                out.append(Command(f"docker-compose.yml: {name} {what}", tuple(argv)))
    return out


# --- Dockerfiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM this instruction belongs to


def dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped (as Docker does)."""
    out: list[Instruction] = []
    stage = -1
    buf = ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        buf = f"{buf} {s}" if buf else s
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        keyword, _, args = buf.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
        buf = ""
    return out


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                if "=" in word:
                    k, v = word.split("=", 1)
                    env[k] = v
    return env


def exec_or_shell(args: str) -> list[str] | str:
    """A CMD / ENTRYPOINT argument: JSON exec form as a list, shell form as a string."""
    import json

    if args.startswith("["):
        return json.loads(args)
    return args


def dockerfile_commands(name: str) -> list[Command]:
    ins = final_stage(dockerfile(DOCKERFILES[name]))
    env = dockerfile_env(ins)
    out = []
    for i in ins:
        if i.keyword == "CMD":
            for argv in container_argv(exec_or_shell(i.args), env):
                out.append(Command(f"{name}.Dockerfile CMD", tuple(argv)))
        if i.keyword == "HEALTHCHECK":
            m = re.search(r"\bCMD\s+(.*)$", i.args)
            assert m, f"{name}.Dockerfile HEALTHCHECK without CMD: {i.args}"
            for argv in container_argv(exec_or_shell(m.group(1)), env):
                out.append(Command(f"{name}.Dockerfile HEALTHCHECK", tuple(argv)))
    return out


def dockerfile_images() -> dict[str, str]:
    """compose image name -> the Dockerfile key that builds it."""
    out = {}
    for svc in compose()["services"].values():
        build = svc.get("build")
        if build and "image" in svc:
            out[svc["image"]] = Path(build["dockerfile"]).name.split(".")[0]
    return out


# --- Kubernetes -----------------------------------------------------------------------------


def kustomization_files() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def k8s_resource_files() -> list[Path]:
    """Manifest files that some kustomization lists as a resource (patches excluded)."""
    out: set[Path] = set()
    for kfile in kustomization_files():
        for res in yaml.safe_load(kfile.read_text()).get("resources", []):
            path = (kfile.parent / res).resolve()
            if path.is_file():
                out.add(path)
    return sorted(out)


def k8s_documents() -> list[tuple[Path, dict]]:
    """Every document of every resource file under deploy/k8s."""
    out = []
    for path in k8s_resource_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def container_env(container: dict, configmaps: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            env.update(configmaps.get(ref["configMapRef"]["name"], {}))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
    return env


def k8s_commands() -> list[Command]:
    docs = k8s_documents()
    configmaps = {
        d["metadata"]["name"]: {k: str(v) for k, v in d.get("data", {}).items()}
        for _, d in docs
        if d.get("kind") == "ConfigMap"
    }
    out = []
    for path, doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            command = list(c.get("command", [])) + list(c.get("args", []))
            if not command:
                continue
            env = container_env(c, configmaps)
            if doc["kind"] == "Job" and doc["spec"].get("completionMode") == "Indexed":
                env["JOB_COMPLETION_INDEX"] = "0"  # set by the Job controller
            # Kubernetes itself expands $(VAR) in command and args.
            command = [re.sub(r"\$\((\w+)\)", r"${\1}", w) for w in command]
            where = f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}"
            for argv in container_argv(command, env):
                out.append(Command(where, tuple(argv)))
    return out


# --- native scripts -------------------------------------------------------------------------


def script_defaults(script: str) -> dict[str, str]:
    """NAME=${VAR:-default} assignments at the top level of a script, resolved in order."""
    env: dict[str, str] = {"PWD": str(ROOT)}
    for m in re.finditer(r"^(?:export\s+)?(\w+)=(\S+)$", script, flags=re.M):
        value = expand(m.group(2).strip('"'), env)
        env[m.group(1)] = value
    return env


def native_commands() -> list[Command]:
    script = (NATIVE / "up.sh").read_text()
    env = script_defaults(script)
    aliases = {"ue": "userembed", env.get("USEREMBED_BIN", ""): "userembed"}
    # A port read from the server log at run time: any number parses.
    env["port"] = "50051"
    env.setdefault("PWD", str(ROOT))
    out = []
    for argv in shell_commands(script, env, aliases):
        out.append(Command("deploy/native/up.sh", tuple(argv)))
    return out

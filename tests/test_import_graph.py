"""The layout's arrows: the contract imports no side, the server and the refresh job never import
torch or the trainer, only the composition root (userembed.commands) ties the sides together,
and no module imports itself back through others. Read from the source, so lazy imports inside
functions and `TYPE_CHECKING` imports count too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("userembed", "trainer", "embed_server", "refresh")
COMMANDS = "userembed.commands"
TORCH = ("torch", "torchrec", "fbgemm_gpu")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "_proto" not in path.parts:
                out[_module_name(path)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every module `name` imports, resolved to the most specific module of the repository."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield target
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    yield f"{target}.{alias.name}"
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            yield "<importlib>"


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _side(module: str) -> str:
    if _within(module, COMMANDS):
        return "commands"
    return module.split(".")[0]


def test_the_graph_covers_the_packages() -> None:
    assert {"userembed.vectors", "trainer.moe", "embed_server.server", "refresh.job"} <= set(GRAPH)
    assert any(_within(m, COMMANDS) for m in GRAPH)


@pytest.mark.parametrize(
    ("side", "forbidden"),
    [
        # The contract: what every side shares; it knows none of them, nor gRPC.
        ("userembed", ("trainer", "embed_server", "refresh", COMMANDS, "grpc", *TORCH)),
        ("trainer", ("embed_server", "refresh", COMMANDS)),
        ("embed_server", ("trainer", "refresh", COMMANDS, *TORCH)),
        ("refresh", ("trainer", "embed_server", COMMANDS, *TORCH)),
    ],
)
def test_no_arrow_runs_back(side: str, forbidden: tuple[str, ...]) -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if _side(module) == side
        for target in targets
        if _within(target, *forbidden) or target == "<importlib>"
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    internal = {m: [t for t in ts if t in GRAPH and t != m] for m, ts in GRAPH.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in internal[module]:
            # A package's __init__ is the root of its own modules' imports, not a dependency.
            if module.startswith(target + "."):
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(internal):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)

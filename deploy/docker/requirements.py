"""Pinned requirement lines of the package's core + chosen extras, read from pyproject.toml.

The images install dependencies from these lines, then the package itself with `--no-deps`,
so the pins stay in one place (pyproject.toml) while an image may swap one distribution for
another that provides the same module: the server image takes `onnxruntime-gpu` instead of
`onnxruntime` (same `onnxruntime` module; installing both breaks it) and drops torch entirely.

Usage: python requirements.py [--pyproject FILE] [--swap OLD=NEW] [--drop NAME] EXTRA...
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

# PEP 508 name at the start of a requirement line (before extras, specifiers or markers).
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def dist_name(requirement: str) -> str:
    """Normalised distribution name of a requirement line (PEP 503: lower case, '-')."""
    m = _NAME.match(requirement)
    if m is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def requirements(
    pyproject: Mapping[str, object],
    extras: Iterable[str],
    swap: Mapping[str, str] | None = None,
    drop: Iterable[str] = (),
) -> list[str]:
    """Core dependencies + `extras`, with `swap` {old name: new name} and `drop` names applied.

    The swapped requirement keeps its version specifier (`onnxruntime==1.31.1` ->
    `onnxruntime-gpu==1.31.1`). Unknown extras, swaps or drops that match nothing raise
    ValueError so that a renamed extra in pyproject.toml breaks the image build loudly.
    """
    project = pyproject["project"]
    assert isinstance(project, dict)
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    lines: list[str] = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"unknown extra {extra!r} (known: {sorted(optional)})")
        lines.extend(optional[extra])
    swap = {dist_name(k): v for k, v in (swap or {}).items()}
    dropped = {dist_name(d) for d in drop}
    out: list[str] = []
    used: set[str] = set()
    for line in lines:
        name = dist_name(line)
        if name in dropped:
            used.add(name)
            continue
        if name in swap:
            used.add(name)
            line = swap[name] + line[_NAME.match(line).end() :]  # type: ignore[union-attr]
        if line not in out:
            out.append(line)
    unused = (set(swap) | dropped) - used
    if unused:
        raise ValueError(f"--swap/--drop match no requirement: {sorted(unused)}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*")
    parser.add_argument(
        "--pyproject", default=str(Path(__file__).resolve().parents[2] / "pyproject.toml")
    )
    parser.add_argument("--swap", action="append", default=[], metavar="OLD=NEW")
    parser.add_argument("--drop", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    swap = dict(s.split("=", 1) for s in args.swap)
    data = tomllib.loads(Path(args.pyproject).read_text())
    try:
        lines = requirements(data, args.extras, swap, args.drop)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

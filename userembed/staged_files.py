"""Files replaced together: written under temporary names, renamed into place at the end.

A data build stages its raw tables, spec.json and the Feast offline tables here, so a build
that fails or is killed part way leaves the previous data set whole, and no reader ever opens a
half-written file. Each file is renamed over its old version with `os.replace` (atomic in one
folder); the renames of one commit follow each other at once, after every file is complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType


class StagedFiles:
    """`path(final)` -> where to write `final` for now; `commit()` renames every staged file
    into place; leaving the `with` block without a commit removes them."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self._removed: list[Path] = []

    def path(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        # Per-process names: two processes that build the same folder at once (the quality
        # bench's processes sharing one --workdir) each rename whole files of their own.
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        self._staged.append((tmp, final))
        return tmp

    def remove(self, final: Path) -> None:
        """Delete `final` at commit (an optional file the new set does not have)."""
        self._removed.append(final)

    def commit(self) -> None:
        for tmp, final in self._staged:
            tmp.replace(final)
        for final in self._removed:
            final.unlink(missing_ok=True)
        self._staged = []
        self._removed = []

    def discard(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []
        self._removed = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()  # nothing is left after a commit

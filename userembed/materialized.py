"""Which offline files the Feast online rows in a Redis came from: a fingerprint per view.

Feast's Redis store keeps the stored row when a re-materialised one has the same event
timestamp (shared/STACK.md), so a data set rebuilt with corrected values and the same dates
would leave the old rows online, and the server would compute from them. Once
`feast_ops.materialize` has written a view's rows, it records the fingerprint of the view's
offline file here; the next materialise re-writes every row of a view whose file changed, and
`userembed check` (userembed.consistency) reports a view whose file changed since.

    ue:feast:{<project>}:materialized   HASH   <feature view> -> sha256 of its offline file

The fingerprint covers the file's path and content (every file, in name order, of a folder
source); a source that is not a local path has none (Feast's newer-row rule then applies). The
key lives in the online store's Redis, beside the rows it describes: an emptied Redis has no
record, and its next materialise writes everything (one key: one slot on a Redis Cluster).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_fingerprint(path: str | Path) -> str | None:
    """sha256 of a local file's (or a folder's files') path and content; None when `path` is
    not on this machine (a remote source)."""
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.resolve()).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def view_fingerprints(views: Iterable[Any]) -> dict[str, str | None]:
    """Feature view name -> fingerprint of its batch source's file (None: not a local file)."""
    return {v.name: file_fingerprint(getattr(v.batch_source, "path", "") or "") for v in views}


class MaterializedRecord:
    """The fingerprints of the offline files whose rows a Feast project holds in a Redis."""

    def __init__(self, client: Any, project: str) -> None:
        self.r = client  # redis.Redis or RedisCluster (userembed.redis_urls.open_redis, Feast's)
        self.key = f"ue:feast:{{{project}}}:materialized"

    def read(self) -> dict[str, str]:
        """View name -> fingerprint of the file its online rows were last materialised from."""
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.key).items()}

    def write(self, fingerprints: Mapping[str, str]) -> None:
        """Record the views just materialised (the others keep their entries)."""
        if fingerprints:
            self.r.hset(self.key, mapping=dict(fingerprints))

    def clear(self) -> None:
        """Forget every view (after `feast teardown` dropped the online rows)."""
        self.r.delete(self.key)

    def stale(self, fingerprints: Mapping[str, str | None]) -> dict[str, str]:
        """Views whose online rows may not come from their file now -> why; a view without a
        fingerprint (not a local file) is never listed."""
        written = self.read()
        out = {}
        for view, now in fingerprints.items():
            if now is None or written.get(view) == now:
                continue
            before = written.get(view)
            out[view] = (
                "no record of the offline file its online rows came from"
                if before is None
                else f"its offline file changed since its online rows were written "
                f"(fingerprint {before[:12]} -> {now[:12]})"
            )
        return out

"""The stored reader is chosen once from the settings; every kind returns the same raw rows, and
only rows the loaded model version made become embeddings."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from embed_server.settings import load_settings
from embed_server.stored_reader import (
    CoalescingReader,
    PipelineReader,
    ScriptReader,
    open_stored_reader,
    plain_hits,
    stored_embedding,
)
from userembed.vectors import VECTOR_FIELDS

HIT = [b"\x00\x00\x80?", b"f32", b"v1", b"5", b"7"]  # VECTOR_FIELDS order; vector [1.0]
MISS = [None] * 5


@pytest.mark.parametrize(
    ("script_reads", "url_options", "kind"),
    [
        (1, "", CoalescingReader),
        (1, "?health_check_interval=30", ScriptReader),  # an option the lean reader lacks
        (0, "", PipelineReader),  # Redis Cluster
    ],
)
def test_each_reader_returns_the_same_rows_for_single_and_batch_reads(
    redis_url, script_reads, url_options, kind
):
    redis.Redis.from_url(redis_url).hset(
        "k:hit", mapping=dict(zip(VECTOR_FIELDS, HIT, strict=True))
    )
    settings = load_settings(
        env={}, redis_url=redis_url + url_options, redis_script_reads=script_reads
    )
    batches: list[int] = []

    async def main():
        client = aioredis.from_url(settings.redis_url)
        reader = open_stored_reader(settings, client, on_batch=batches.append)
        reader.start()
        try:
            single = await asyncio.gather(*(reader.read(k, None) for k in (b"k:hit", b"k:none")))
            many = await reader.read_many([b"k:none", b"k:hit"])
        finally:
            await reader.close()
            await client.aclose()
        return reader, single, many

    reader, single, many = asyncio.run(asyncio.wait_for(main(), 30))
    assert type(reader) is kind
    no_marker = [None]  # each row ends with the user's pushed marker (docs/freshness.md)
    assert [list(r) for r in single] == [HIT + no_marker, MISS + no_marker]
    assert [list(r) for r in many] == [MISS + no_marker, HIT + no_marker]
    assert sum(batches) == 2  # the single reads were batched and observed; read_many is not


def test_only_rows_of_the_loaded_model_version_become_embeddings():
    model = SimpleNamespace(name="m", version="v1", version_bytes=b"v1", dim=1)
    f16 = [np.float16(1.0).tobytes(), b"f16", b"v1", None, None]
    rows = [HIT, MISS, [HIT[0], b"f32", b"v0", b"5", b"7"], [b"\x00" * 8, *HIT[1:]], f16]
    assert plain_hits(model, rows) == [True, False, False, False, False]
    got = [stored_embedding(model, "ev", "u", row) for row in rows]
    assert got[1] is None and got[2] is None and got[3] is None  # absent, other version, bad size
    hit, from_f16 = got[0], got[4]
    assert hit is not None and from_f16 is not None
    assert hit.vector.tolist() == [1.0] and from_f16.vector.tolist() == [1.0]
    assert (hit.source, hit.embedding_version, hit.computed_at_ms, hit.feature_ts_ms) == (
        "stored",
        "ev",
        5,
        7,
    )
    assert (from_f16.computed_at_ms, from_f16.feature_ts_ms) == (0, 0)

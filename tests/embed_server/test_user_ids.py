"""One canonical id per user at the server's door: other spellings of an id are refused before
any key is built, any feature is read or the encoder runs (issue #21)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from embed_server.client import EmbeddingClient, ItemError
from embed_server.online_features import FeastFeatureSource, FeatureRows
from tests.embed_server.conftest import SPEC, FakeFeatures, publish_tiny
from tests.userembed.test_ids import OTHER_SPELLINGS
from userembed.errors import InvalidInputError
from userembed.features import InputSpec
from userembed.registry import Registry


class FeastLikeFeatures(FakeFeatures):
    """Finds a user by the int64 its id spells, as Feast's entity key does: with it, every
    spelling of 42 that gets past the server's door reads user 42's features."""

    def fetch(self, user_ids: Sequence[str], spec: InputSpec) -> FeatureRows:
        self.fetched.append(list(user_ids))
        return super().fetch([str(int(u)) for u in user_ids], spec)


@pytest.fixture
def features() -> FakeFeatures:
    f = FeastLikeFeatures()
    f.add("42", items=[4, 2, 42])
    return f


@pytest.fixture
def v1(registry: Registry, tmp_path: Path) -> str:
    return publish_tiny(registry, tmp_path / "staging", seed=1)


def test_other_spellings_of_an_id_are_refused_and_write_no_key(
    start_server, v1, redis_url, features: FeastLikeFeatures
) -> None:
    srv = start_server()
    r = redis.Redis.from_url(redis_url)
    with EmbeddingClient(f"127.0.0.1:{srv.port}") as c:
        first = c.get("42")
        assert first.source == "computed"
        keys = set(r.keys("*"))
        fetches = len(features.fetched)
        for spelling in OTHER_SPELLINGS:
            for force in (False, True):
                with pytest.raises(grpc.RpcError) as ei:
                    c.get(spelling, force=force)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(spelling)
        for packed in (False, True):
            res = c.batch_get(["42", *OTHER_SPELLINGS], force=True, packed=packed)
            assert not isinstance(res[0], ItemError)
            assert [r.code for r in res[1:] if isinstance(r, ItemError)] == [
                grpc.StatusCode.INVALID_ARGUMENT
            ] * len(OTHER_SPELLINGS)
        stored = c.get("42")
    assert set(r.keys("*")) == keys  # no key for any other spelling
    assert all(batch == ["42"] for batch in features.fetched[fetches:])  # nothing else encoded
    assert stored.source == "stored"
    np.testing.assert_allclose(stored.vector, first.vector, rtol=1e-6)


def test_feast_reads_refuse_other_spellings_before_touching_the_store() -> None:
    source = FeastFeatureSource(store=None)  # any store call would fail: none is made
    for spelling in ("042", "+42", "４２"):
        with pytest.raises(InvalidInputError, match="canonical"):
            source.fetch(["42", spelling], SPEC)

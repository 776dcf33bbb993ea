"""One way to say "this Redis is a cluster" (the `redis+cluster://` scheme), read the same by every
client the platform opens and by the Feast configuration."""

from __future__ import annotations

import socket

import pytest
import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster

from userembed import feast_ops, status
from userembed.errors import InvalidInputError
from userembed.local_redis import wait_until_up
from userembed.redis_urls import is_cluster, node_url, open_async_pubsub, open_redis, redacted


def test_the_scheme_says_cluster_and_nothing_else_does() -> None:
    assert is_cluster("redis+cluster://a:1") and is_cluster("REDISS+CLUSTER://u:p@a:1")
    assert not is_cluster("redis://a:1/0") and not is_cluster("rediss://a:1?cluster=1")
    assert node_url("rediss+cluster://u:p%40@a:1?socket_timeout=3") == (
        "rediss://u:p%40@a:1?socket_timeout=3"
    )
    assert node_url("redis://a:1/2") == "redis://a:1/2"
    assert redacted("redis+cluster://app:s3cret@a:1") == "redis+cluster://app:***@a:1"


def test_feast_connection_string_of_a_cluster_has_no_db_and_the_cluster_type(tmp_path) -> None:
    timeouts = "socket_connect_timeout=2.0,socket_timeout=5.0"
    url = "rediss+cluster://app:p%2Cw@seed:7000"
    assert feast_ops.redis_connection_string(url) == (
        f'seed:7000,{timeouts},username="app",password="p\\u002cw",ssl=true'
    )
    assert feast_ops.feast_online_store_type(url) == "redis_cluster"
    assert feast_ops.feast_online_store_type("redis://seed:7000/0") == "redis"
    with pytest.raises(InvalidInputError, match="only db 0"):
        feast_ops.redis_connection_string("redis+cluster://seed:7000/3")


def test_open_redis_gives_a_cluster_client_that_sees_every_master(redis_cluster_url) -> None:
    wait_until_up(redis_cluster_url)  # pings the seed node
    client = open_redis(redis_cluster_url, socket_timeout=5)
    assert isinstance(client, RedisCluster) and len(client.get_primaries()) == 3
    for i in range(30):
        client.set(f"t:{{{i}}}", i)
    assert status.redis_check(client, redacted(redis_cluster_url)).details == {"keys": 30}


def test_pubsub_of_a_cluster_url_is_a_plain_client_of_its_seed_node() -> None:
    """redis-py's async cluster client has no pub/sub: the seed node's own client, with the
    URL's credentials and TLS (it connects at its first command)."""
    client = open_async_pubsub("rediss+cluster://app:s3cret@seed:7000?socket_timeout=3")
    kw = client.connection_pool.connection_kwargs
    assert type(client) is aioredis.Redis and (kw["host"], kw["port"]) == ("seed", 7000)
    assert (kw["username"], kw["password"], kw["socket_timeout"]) == ("app", "s3cret", 3.0)
    assert client.connection_pool.connection_class is aioredis.SSLConnection


def test_open_redis_of_a_plain_url_is_one_server(redis_url) -> None:
    client = open_redis(redis_url)
    assert type(client) is redis.Redis and client.ping()


def test_a_cluster_url_without_a_node_that_answers_is_a_connection_error() -> None:
    """redis-py's cluster client reads the slot map when it is opened: no node -> the same
    redis.ConnectionError as a single server's first command, without the password."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(redis.ConnectionError) as ei:
        open_redis(f"redis+cluster://app:s3cret@127.0.0.1:{port}", socket_connect_timeout=1)
    assert "app:***@127.0.0.1" in str(ei.value) and "s3cret" not in str(ei.value)

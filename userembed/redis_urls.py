"""Redis URLs: which client a URL opens (`open_redis`), and how a URL may be shown (`redacted`).

    open_redis("redis://app:s%40cret@redis:6379/0")     # one Redis server: redis.Redis
    open_redis("redis+cluster://redis-0:6379")          # Redis Cluster: redis.cluster.RedisCluster
    redacted("redis://app:s%40cret@redis:6379/0")       # -> "redis://app:***@redis:6379/0"

The scheme is the one way to say "this Redis is a cluster": `redis+cluster://` (`rediss+cluster://`
with TLS) names one seed node, any node of the cluster; the client discovers the others and routes
each key to the master of its slot. Everything else in the URL (user, password, TLS, timeouts)
means what it means for one server; a cluster has only database 0. Every client of the platform
(the server, the refresh, the CLI) is opened here, so a URL means the same everywhere.

`redacted` replaces the password (in the userinfo or a `password=` query option) by `***`; the
user name, host, port and database stay, so a reader still sees which Redis and which ACL user.
"""

from __future__ import annotations

import re
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")  # the plain scheme is before the "+"

# What `open_redis` returns: one server or a cluster; both take the same key commands,
# pipelines (a cluster pipeline routes per slot) and single-slot transactions and scripts.
RedisClient: TypeAlias = redis.Redis | RedisCluster
AsyncRedisClient: TypeAlias = aioredis.Redis | aioredis.RedisCluster


def is_cluster(url: str) -> bool:
    """Whether `url` names a Redis Cluster (`redis+cluster://` or `rediss+cluster://`)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def node_url(url: str) -> str:
    """`url` with its plain scheme (redis:// or rediss://): what redis-py and Feast parse."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.partition('+')[0]}{sep}{rest}" if is_cluster(url) else url


def open_redis(url: str, **options: Any) -> RedisClient:
    """The blocking client of `url`: a RedisCluster for a cluster URL, else redis.Redis.
    `options` are redis-py connection options (socket timeouts, ...). A cluster client needs a
    node that answers now (redis.ConnectionError otherwise); a single-server client and
    `open_async_redis` connect at their first command."""
    if is_cluster(url):
        try:  # redis-py reads the slot map here already, not at the first command
            return RedisCluster.from_url(node_url(url), **options)
        except RedisClusterException as e:  # no node answers: an outage, as for one server
            raise redis.ConnectionError(f"Redis Cluster at {redacted(url)}: {e}") from e
    return redis.Redis.from_url(url, **options)


def open_async_redis(url: str, **options: Any) -> AsyncRedisClient:
    """The asyncio client of `url` (see `open_redis`)."""
    if is_cluster(url):
        return aioredis.RedisCluster.from_url(node_url(url), **options)
    return aioredis.Redis.from_url(url, **options)


def open_async_pubsub(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio client for pub/sub on `url`. On a cluster: a plain client of the URL's seed
    node, since redis-py's async cluster client has neither PUBLISH nor SUBSCRIBE, and a
    PUBLISH on any node reaches the subscribers of every node (the cluster bus carries it)."""
    return aioredis.Redis.from_url(node_url(url), **options)


MASK = "***"
_QUERY_PASSWORD = re.compile(r"(?i)(^|&)(password=)[^&]*")


def redacted(url: str) -> str:
    """`url` without its password (a string that does not parse loses everything after //)."""
    try:
        u = urlsplit(url)
    except ValueError:
        return url.split("//", 1)[0] + "//" + MASK
    netloc = u.netloc
    creds, at, hostport = netloc.rpartition("@")
    if at and ":" in creds:
        netloc = f"{creds.partition(':')[0]}:{MASK}@{hostport}"
    elif at and creds:  # redis://secret@host: a password written without its ":" is common
        netloc = f"{MASK}@{hostport}"
    query = _QUERY_PASSWORD.sub(rf"\1\2{MASK}", u.query)
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))

"""The one boundary around the Redis driver, for the service and the offline publisher alike.

Every driver error becomes one exception of the caller's choosing: :class:`RedisUnavailable` for
the service (mapped to fallbacks / UNAVAILABLE), ``PublishError`` for the worker. The cluster
client's own errors (``RedisClusterException``, e.g. no reachable startup node or an uncovered
slot) are not ``RedisError`` subclasses, and socket errors can surface as bare ``OSError``: all
three are caught here so no caller has to remember them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

__all__ = ["DRIVER_ERRORS", "RedisCluster", "connect", "redis_errors"]
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from service.config import RedisSettings
from service.errors import RedisUnavailable

DRIVER_ERRORS = (RedisError, RedisClusterException, OSError)


@contextmanager
def redis_errors(what: str, error: Callable[[str], Exception] = RedisUnavailable) -> Iterator[None]:
    """A plain (sync) context manager: it also guards ``await``s inside an async function."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise error(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc


def connect(settings: RedisSettings, socket_timeout_ms: int | None = None) -> Any:
    """An asyncio client (standalone or cluster) with short timeouts and no retries: the request
    deadline, not the driver, decides how long to wait. ``socket_timeout_ms``: other than the
    settings' read timeout (the writes' client)."""
    timeout_ms = socket_timeout_ms if socket_timeout_ms is not None else settings.socket_timeout_ms
    common: dict[str, Any] = {
        "socket_timeout": timeout_ms / 1000,
        "socket_connect_timeout": settings.connect_timeout_ms / 1000,
        "max_connections": settings.max_connections,
        "decode_responses": False,
    }
    if settings.cluster:
        # No retries here either (the default is 3 with backoff: seconds on a dead primary).
        # MOVED/ASK redirects are followed regardless, and a connection error makes the client
        # reload the slot map before its next command.
        return RedisCluster.from_url(settings.url, retry=Retry(NoBackoff(), 0), **common)
    return aioredis.Redis.from_url(
        settings.url, retry=Retry(NoBackoff(), 0), health_check_interval=0, **common
    )

"""The one Redis behind the queue, the job store and the ledger, named by one URL.

- `redis://host:port/db`: a single server (the local mesh's).
- `redis+sentinel://host1:port1,host2:port2,host3:port3/<master name>/<db>`: Redis Sentinel. Clients
  ask the sentinels where the current primary is, and ask again after a failover. redis-py's
  `Sentinel` serves the job store and the ledger; Celery uses kombu's own `sentinel://` transport for
  the broker and its sentinel result backend, both given the master's name.
  A password for the primary goes before the hosts (`redis+sentinel://:secret@h1:p1,.../<master>/<db>`).

`VISEARCH_REDIS_URL` takes either form: every component of a mesh reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel://"


@dataclass(frozen=True)
class SentinelTarget:
    hosts: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    password: str | None = None


def parse_sentinel(url: str) -> SentinelTarget | None:
    """The sentinels, master name and db of a `redis+sentinel://` URL; None for any other URL.
    ValueError says what is wrong with a malformed one."""
    if not url.startswith(SENTINEL_SCHEME):
        return None
    rest = url[len(SENTINEL_SCHEME):]
    password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[1] if ":" in auth else auth) or None
    hosts_part, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts_part or not parts:
        raise ValueError(f"{url!r}: expected {SENTINEL_SCHEME}host:port[,host:port...]/<master name>[/<db>]")
    hosts = []
    for h in hosts_part.split(","):
        host, _, port = h.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url!r}: sentinel {h!r} is not host:port")
        hosts.append((host, int(port)))
    db = parts[1] if len(parts) > 1 else "0"
    if not db.isdigit():
        raise ValueError(f"{url!r}: db {db!r} is not a number")
    return SentinelTarget(tuple(hosts), parts[0], int(db), password)


def with_password(url: str, password: str) -> str:
    """`url` with `password` as its password (percent-encoded), for a password kept apart from the URL
    (VISEARCH_REDIS_PASSWORD). ValueError when the URL already has another password."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss", "redis+sentinel"):
        raise ValueError(f"a Redis password can only be added to a redis://, rediss:// or {SENTINEL_SCHEME} URL, "
                         f"not {scheme or url!r}")
    netloc, slash, path = rest.partition("/")
    user, at, hosts = netloc.rpartition("@")
    if at:
        name, colon, own = user.partition(":")
        if colon and own:
            if unquote(own) != password:
                raise ValueError("the Redis URL has a password of its own and a different one is given apart from it")
            return url
    else:
        name, hosts = "", netloc
    return f"{scheme}://{name}:{quote(password, safe='')}@{hosts}{slash}{path}"


def client(url: str, socket_timeout: float = 5, socket_connect_timeout: float = 2) -> redis.Redis:
    """A client of the Redis the URL names: for Sentinel, one that follows the primary."""
    target = parse_sentinel(url)
    if target is None:
        return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout)
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    sentinel = Sentinel(list(target.hosts), sentinel_kwargs=timeouts, **timeouts)
    return sentinel.master_for(target.master, db=target.db, password=target.password, **timeouts)


def async_client(url: str, socket_timeout: float = 5, socket_connect_timeout: float = 2, retries: int | None = None):
    """The asyncio counterpart of `client` (for work on a server's event loop, e.g. the rate limiter);
    `retries` replaces redis-py's own retries of a failed command (None: its default)."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel
    from redis.backoff import NoBackoff

    target = parse_sentinel(url)
    options: dict = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    if retries is not None:
        options["retry"] = Retry(NoBackoff(), retries)
    if target is None:
        return aredis.Redis.from_url(url, **options)
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    sentinel = AsyncSentinel(list(target.hosts), sentinel_kwargs=timeouts, **timeouts)
    return sentinel.master_for(target.master, db=target.db, password=target.password, **options)


def celery_urls(url: str) -> tuple[str, str, dict]:
    """(broker URL, result backend URL, transport options to add) for Celery: the URL itself for a
    single server; kombu's `sentinel://h1:p1/db;sentinel://h2:p2/db` with the master's name for Sentinel
    (the same options serve the broker and the result backend)."""
    target = parse_sentinel(url)
    if target is None:
        return url, url, {}
    auth = f":{quote(target.password, safe='')}@" if target.password else ""  # kombu unquotes it
    joined = ";".join(f"sentinel://{auth}{h}:{p}/{target.db}" for h, p in target.hosts)
    return joined, joined, {"master_name": target.master}

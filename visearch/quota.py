"""Per-key call rates at the gateway: a token bucket per API key in Redis, shared by every replica.

A key's rate is its "rate" in the key file (visearch/auth.py), else the gateway's default
(VISEARCH_RATE_PER_SECOND, VISEARCH_RATE_BURST; off by default). A call over it is refused before
its handler runs: RESOURCE_EXHAUSTED naming the key and its rate, with `retry-after` (seconds) in
the trailing metadata, which the SDK waits and retries on. The internal token, health checks and
an auth-off gateway are never limited. Redis unreachable: calls pass unlimited (availability over
quota), said once in the log until it answers again. docs/QUOTAS.md.
"""

from __future__ import annotations

import logging
import math
import time

import grpc
import redis

from visearch import observability as obs
from visearch import redisconn
from visearch.auth import INTERNAL, OPEN_PREFIXES, Authenticator, Principal, Rate, Unauthenticated, refuse
from visearch.grpcserver import RETRY_AFTER
from visearch.settings import QuotaSettings

log = logging.getLogger(__name__)
KEY_PREFIX = "vs:rate:"

# One atomic step per call (no read-modify-write between replicas): refill the bucket for the time
# since its last call, take a token if there is one, else say how long until there is. The clock is
# Redis's own, so replicas with skewed clocks still share one bucket. A bucket left alone refills in
# burst / rate seconds, after which it expires (a missing bucket is a full one).
# KEYS[1]: the bucket; ARGV: per_second, burst. Returns {1, "0"} or {0, "<seconds to wait>"}.
_TAKE = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local ok = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {ok, tostring(wait)}
"""


def default_rate(s: QuotaSettings) -> Rate | None:
    """The rate of keys that name none; None when the gateway sets no default."""
    if s.rate_per_second <= 0:
        return None
    return Rate(s.rate_per_second, s.rate_burst or max(1.0, s.rate_per_second))


def format_wait(seconds: float) -> str:
    """Seconds for the retry-after trailer, rounded up to the next hundredth (at least 0.01)."""
    return f"{max(0.01, math.ceil(seconds * 100) / 100):.2f}"


class RateLimiter:
    """Takes one token from a key's bucket per call; fails open while Redis does not answer."""

    def __init__(self, redis_url: str, default: Rate | None = None, retry_seconds: float = 1.0,
                 timeout_seconds: float = 0.5):
        # Short timeouts: a call waits at most this long on a Redis that does not answer, and after
        # a failure calls pass without asking for `retry_seconds`, so an outage costs no latency.
        self.r = redisconn.async_client(redis_url, socket_timeout=timeout_seconds,
                                        socket_connect_timeout=timeout_seconds, retries=0)
        self.take_script = self.r.register_script(_TAKE)
        self.default = default
        self.retry_seconds = retry_seconds
        self.failing = False
        self._ask_after = 0.0

    def rate_of(self, p: Principal) -> Rate | None:
        """The rate that applies to a caller; None: not limited."""
        if p is INTERNAL or p.id == "anonymous":
            return None
        rate = p.rate if p.rate is not None else self.default
        return rate if rate is not None and rate.limited else None

    async def take(self, key_id: str, rate: Rate) -> float | None:
        """None when the call may go ahead, else the seconds until the key has a token again."""
        now = time.monotonic()
        if self.failing and now < self._ask_after:
            return None
        try:
            ok, wait = await self.take_script(keys=[KEY_PREFIX + key_id], args=[repr(rate.per_second), repr(rate.burst)])
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self._ask_after = now + self.retry_seconds
            if not self.failing:
                self.failing = True
                log.warning("rate limits are off: Redis does not answer (%s: %s); calls pass unlimited until it does",
                            type(exc).__name__, exc)
            return None
        if self.failing:
            self.failing = False
            log.info("rate limits apply again: Redis answers")
        return None if int(ok) else float(wait)

    async def close(self) -> None:
        await self.r.aclose()


class RateLimitInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call over its key's rate with RESOURCE_EXHAUSTED and `retry-after`, before its handler runs."""

    def __init__(self, limiter: RateLimiter, auth: Authenticator):
        self.limiter, self.auth = limiter, auth

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES) or not self.auth.enabled:
            return handler
        try:
            principal = self.auth.authenticate(details.invocation_metadata)
        except Unauthenticated:  # the auth interceptor refuses it; there is no key to count it against
            return handler
        rate = self.limiter.rate_of(principal)
        if rate is None:
            return handler
        wait = await self.limiter.take(principal.id, rate)
        if wait is None:
            return handler
        obs.RATE_LIMITED.labels(principal.id).inc()
        after = format_wait(wait)
        message = (f"key {principal.id!r} is over its rate of {rate.per_second:g} calls/s (burst {rate.burst:g}): "
                   f"retry after {after} s")
        return refuse(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, message, ((RETRY_AFTER, after),), parse=True)


def rate_interceptor(s: QuotaSettings, redis_url: str, auth: Authenticator) -> RateLimitInterceptor | None:
    """The gateway's rate limit, or None when neither the default nor any key sets a rate (no Redis traffic)."""
    default = default_rate(s)
    if not auth.enabled or (default is None and not any(p.rate is not None and p.rate.limited
                                                        for p in auth.keys.by_hash.values())):
        return None
    log.info("rate limits on", extra={"default_per_second": default.per_second if default else 0,
                                      "default_burst": default.burst if default else 0})
    return RateLimitInterceptor(RateLimiter(redis_url, default), auth)

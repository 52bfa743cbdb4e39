"""Client-side gRPC plumbing: channels to a visearch service (TLS when configured, the API key or
internal token on every call, the request id carried on), their options, request splitting and the
retry-after trailer of a throttled call.

The SDK (`visearch.client`) and the services' own clients share it; it imports nothing of the server
side (no health or reflection services, no metrics, no settings at import time), so `pip install
visearch` without extras can use it.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from visearch.auth import TokenAuth

if TYPE_CHECKING:
    from visearch.clientsettings import SecuritySettings

# Bytes of images per request a client sends (gRPC refuses a message over max_message_bytes, 64 MiB by
# default): a larger batch is sent as several requests.
REQUEST_BUDGET = 48 * 1024 * 1024
# Trailing metadata of a RESOURCE_EXHAUSTED that will pass again later: seconds to wait ("0.35").
RETRY_AFTER = "retry-after"


def client_options(max_message_bytes: int = 64 * 1024 * 1024) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # round_robin: a DNS name with several addresses spreads calls over all of them.
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.enable_retries", 1),
        # Reconnect within seconds when a dependency comes back (the default backoff grows to 2 minutes).
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def _read(path) -> bytes:
    return open(path, "rb").read()


def channel_credentials(s: SecuritySettings) -> grpc.ChannelCredentials | None:
    if not s.tls_ca_file:
        return None
    cert = _read(s.tls_client_cert_file) if s.tls_client_cert_file else None
    key = _read(s.tls_client_key_file) if s.tls_client_key_file else None
    return grpc.ssl_channel_credentials(_read(s.tls_ca_file), key, cert)


def _request_id(metadata) -> tuple[tuple[str, str], ...]:
    """The x-request-id entry a call carries on: the context's, unless the caller set one itself.

    The id lives in visearch.observability (a server-side module, with its metrics): when no one has
    imported it, no request id can be set, and the SDK does not import it for nothing."""
    obs = sys.modules.get("visearch.observability")
    rid = obs.request_id.get() if obs is not None else ""
    if not rid or any(k == "x-request-id" for k, _ in (metadata or ())):
        return ()
    return (("x-request-id", rid),)


def _tracing():
    """visearch.tracing when this process imported it (the services and workers, to set traces up);
    the SDK never does, and where no one imported it no trace can be on: no interceptor then."""
    return sys.modules.get("visearch.tracing")


def _aio_tracing_interceptors() -> list:
    t = _tracing()
    return t.aio_client_interceptors() if t is not None else []


def _traced(channel):
    t = _tracing()
    return t.traced_channel(channel) if t is not None else channel


class _Metadata(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata):
        self.metadata = tuple(metadata)

    async def intercept_unary_unary(self, continuation, details, request):
        md = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata, *_request_id(details.metadata))
        return await continuation(details._replace(metadata=md), request)


def aio_channel(address: str, s: SecuritySettings, key: str = "", max_message_bytes: int = 64 * 1024 * 1024):
    """An asyncio channel to a visearch service: TLS when configured, credentials on every call."""
    key = key or s.internal_token.get_secret_value()
    interceptors = [*_aio_tracing_interceptors(), _Metadata((("authorization", f"Bearer {key}"),) if key else ())]
    creds = channel_credentials(s)
    opts = client_options(max_message_bytes)
    if creds:
        return grpc.aio.secure_channel(address, creds, opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, opts, interceptors=interceptors)


def sync_channel(address: str, s: SecuritySettings, key: str = "", options=None):
    """The blocking counterpart of `aio_channel` (workers and the CLI)."""
    key = key or s.internal_token.get_secret_value()
    creds = channel_credentials(s)
    opts = options or client_options()
    if creds:
        if key:
            creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(TokenAuth(key)))
        return _traced(grpc.secure_channel(address, creds, opts))
    return _traced(grpc.intercept_channel(grpc.insecure_channel(address, opts), _SyncMetadata(key)))


class _SyncMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, key: str):
        self.md = (("authorization", f"Bearer {key}"),) if key else ()

    def _details(self, d):
        md = tuple(d.metadata or ()) + self.md + _request_id(d.metadata)
        return _CallDetails(d.method, d.timeout, md, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(
        collections.namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
        grpc.ClientCallDetails):
    pass


def split_by_bytes(items: list, size_of: Callable[[object], int], budget: int = REQUEST_BUDGET) -> list[list]:
    """`items` in consecutive parts of at most `budget` bytes each (an item larger than that alone)."""
    parts: list[list] = []
    cur: list = []
    n = 0
    for it in items:
        s = size_of(it)
        if cur and n + s > budget:
            parts.append(cur)
            cur, n = [], 0
        cur.append(it)
        n += s
    if cur or not parts:
        parts.append(cur)
    return parts


def too_large(exc: grpc.RpcError) -> bool:
    """Whether a RESOURCE_EXHAUSTED is gRPC refusing a message's size (final) rather than a busy server."""
    return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in (exc.details() or "")


def retry_after(exc: grpc.RpcError) -> float | None:
    """The seconds a refused call says to wait before trying again (a key over its rate), else None."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    try:
        trailers = exc.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a call that never reached a server has none
        return None
    for key, value in trailers:
        if key == RETRY_AFTER:
            try:
                seconds = float(value)
            except ValueError:
                return None
            return seconds if 0 <= seconds < float("inf") else None
    return None

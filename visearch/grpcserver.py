"""What every gRPC service shares: health, reflection, error mapping, graceful stop."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from visearch import observability as obs
from visearch import tracing
from visearch.auth import Authenticator, AuthInterceptor, KeyStore
from visearch.auth import current as current_principal
from visearch.channels import (  # noqa: F401 - the client side, re-exported for the services
    REQUEST_BUDGET,
    RETRY_AFTER,
    aio_channel,
    channel_credentials,
    client_options,
    retry_after,
    split_by_bytes,
    sync_channel,
    too_large,
)
from visearch.errors import InvalidArgument, to_status
from visearch.settings import SecuritySettings, ServerSettings

log = logging.getLogger(__name__)
access = logging.getLogger("visearch.access")
MAX_MESSAGE = 1000  # characters of an error message sent back


class _Undecodable:
    """A request that did not parse (e.g. a string field that is not UTF-8)."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    if deserializer is None:  # a handler that takes the bytes as they are (e.g. the auth refusal)
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - answered INVALID_ARGUMENT by the handler
            return _Undecodable(exc)

    return parse


def rpc(dependency_of: Callable[[BaseException], str | None] | None = None):
    """Decorate an async servicer method: exceptions become gRPC statuses, in one place."""

    def wrap(method):
        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            try:
                _authenticate(self, context)
                return await method(self, request, context)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the mapping point
                await _abort(method.__name__, exc, context)

        return handler

    return wrap


def rpc_stream(method):
    """`rpc` for a server-streaming method (an async generator): an exception raised before or
    between the messages it yields ends the stream with its status."""

    @functools.wraps(method)
    async def handler(self, request, context: grpc.aio.ServicerContext):
        try:
            _authenticate(self, context)
            async for message in method(self, request, context):
                yield message
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the mapping point
            await _abort(method.__name__, exc, context)

    return handler


def _authenticate(servicer, context: grpc.aio.ServicerContext) -> None:
    auth = getattr(servicer, "auth", None)
    if auth is not None:
        current_principal.set(auth.authenticate(context.invocation_metadata()))


async def _abort(name: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code, message = to_status(exc, getattr(exc, "dependency", None))
    # gRPC drops a status message over 16 KiB (percent-encoded): a message quoting a
    # caller's string is cut to MAX_MESSAGE characters, in the answer and the log.
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error in %s", name, exc_info=exc)
    else:
        log.info("%s -> %s: %s", name, code.name, message)
    await context.abort(code, message)


def remaining(context: grpc.aio.ServicerContext, cap: float) -> float:
    """The timeout for a downstream call: ours, capped by what the caller gave us."""
    left = context.time_remaining()
    return cap if left is None else max(0.001, min(cap, left))


async def decode_bounded(fn: Callable[[], object], timeout: float):
    """Run decoding work off the event loop, refusing inputs that take longer than `timeout`.

    The thread cannot be killed; the pixel limits in visearch.imaging bound how long it runs on.
    """
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn), timeout)
    except TimeoutError:
        raise InvalidArgument(f"image took longer than {timeout:g}s to decode") from None


@dataclass
class Service:
    """One servicer to mount: its full proto name, the add_*_to_server function and the object."""

    name: str
    add: Callable[[object, grpc.aio.Server], None]
    servicer: object


async def serve(
    services: Iterable[Service],
    settings: ServerSettings,
    port: int,
    ready: Callable[[], Awaitable[bool]],
    on_stop: Callable[[], Awaitable[None]] | None = None,
    started: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> None:
    """Run a grpc.aio server until SIGTERM/SIGINT (or `stop` is set), then drain.

    Health is NOT_SERVING until `ready()` says the service's dependencies answer,
    and is re-checked every `health_interval_seconds`. `interceptors` run after the
    in-flight limit and authentication (a service's own: the gateway's audit and rate limit).
    """
    services = list(services)
    names = [s.name for s in services]
    opts = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    auth = authenticator(settings)
    # Tracing's interceptor first (none when off): its server span is current in the others and the handler.
    chain = [*tracing.server_interceptors(),
             InFlightLimit(settings.max_in_flight, names[0].rsplit(".", 1)[-1] if names else ""),
             AuthInterceptor(auth), *interceptors]
    obs.serve_metrics(settings.metrics_port, settings.host)
    server = grpc.aio.server(options=opts, interceptors=chain)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for s in services:
        s.add(s.servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    creds = server_credentials(settings)
    address = f"{settings.host}:{port}"
    bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"could not bind {settings.host}:{port}")

    async def set_all(status):
        for n in ["", *names]:
            await health_servicer.set(n, status)

    await set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("listening", extra={"address": f"{settings.host}:{bound}", "services": names, "tls": bool(creds),
                                 "auth": settings.auth, "max_in_flight": settings.max_in_flight})

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    async def watch_health():
        serving = None
        while not stop.is_set():
            try:
                ok = await asyncio.wait_for(ready(), timeout=max(1.0, settings.health_interval_seconds))
            except Exception as exc:  # noqa: BLE001 - a failing check means not ready
                log.warning("readiness check failed: %s", exc)
                ok = False
            if ok != serving:
                serving = ok
                await set_all(health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)
                log.info("health %s", "SERVING" if ok else "NOT_SERVING")
            try:
                await asyncio.wait_for(stop.wait(), timeout=settings.health_interval_seconds)
            except TimeoutError:
                pass

    watcher = asyncio.create_task(watch_health())
    if started is not None:
        started.set()
    await stop.wait()
    log.info("stopping: draining in-flight calls", extra={"grace_seconds": settings.grace_seconds})
    await set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
    watcher.cancel()
    await server.stop(settings.grace_seconds)
    if on_stop is not None:
        await on_stop()
    log.info("stopped")


async def channel_ready(channel: grpc.aio.Channel, service: str = "", timeout: float = 1.0) -> bool:
    """True when the peer's health service says SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def _read(path) -> bytes:
    return open(path, "rb").read()


def server_credentials(s: SecuritySettings) -> grpc.ServerCredentials | None:
    if not s.tls_cert_file:
        return None
    if not s.tls_key_file:
        raise ValueError("tls_cert_file is set but tls_key_file is not")
    ca = _read(s.tls_client_ca_file) if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(_read(s.tls_key_file), _read(s.tls_cert_file))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def authenticator(s: SecuritySettings) -> Authenticator:
    if s.auth == "off":
        log.warning("authentication is OFF: every caller is trusted")
        return Authenticator(None, enabled=False)
    token = s.internal_token.get_secret_value()
    keys = KeyStore.load(s.api_keys_file) if s.api_keys_file else None
    if not token and keys is None:
        raise ValueError("auth is on but neither VISEARCH_API_KEYS_FILE nor VISEARCH_INTERNAL_TOKEN is set "
                         "(set VISEARCH_AUTH=off only for local experiments)")
    return Authenticator(keys, token)


class InFlightLimit(grpc.aio.ServerInterceptor):
    """At most `limit` unary calls at once (health checks excepted); the rest get RESOURCE_EXHAUSTED at once.

    Also where each call is measured (latency by method and status code) and gets
    its request id (the caller's `x-request-id`, or a new one).
    """

    def __init__(self, limit: int, service: str = ""):
        self.limit = limit
        self.in_flight = 0
        self.service = service

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        inner = handler.unary_unary
        method = details.method.rsplit("/", 1)[-1]
        rid = dict(details.invocation_metadata or ()).get("x-request-id", "")

        async def limited(request, context):
            obs.bind_request_id(rid or obs.new_request_id())
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is not a valid {method} message (strings must be UTF-8): "
                                    f"{str(request.error)[:200]}")
            if self.in_flight >= self.limit:
                obs.RPC_REJECTED.labels(self.service).inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"server busy: {self.in_flight} calls in flight (limit {self.limit}); retry later")
            self.in_flight += 1
            obs.RPC_IN_FLIGHT.labels(self.service).inc()
            t0 = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)
            except BaseException:
                c = context.code()
                code = c.name if isinstance(c, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                self.in_flight -= 1
                obs.RPC_IN_FLIGHT.labels(self.service).dec()
                secs = time.perf_counter() - t0
                obs.RPC_SECONDS.labels(self.service, method, code).observe(secs)
                access.info("rpc", extra={"method": method, "code": code, "ms": round(secs * 1000, 2)})

        return grpc.unary_unary_rpc_method_handler(limited, request_deserializer=_tolerant(handler.request_deserializer),
                                                   response_serializer=handler.response_serializer)


def run(coro_factory: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_factory())

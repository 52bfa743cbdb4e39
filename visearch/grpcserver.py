"""What every gRPC service shares: health, reflection, error mapping, graceful stop."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from visearch.errors import to_status
from visearch.settings import ServerSettings

log = logging.getLogger(__name__)


def rpc(dependency_of: Callable[[BaseException], str | None] | None = None):
    """Decorate an async servicer method: exceptions become gRPC statuses, in one place."""

    def wrap(method):
        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            try:
                return await method(self, request, context)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the mapping point
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                code, message = to_status(exc, getattr(exc, "dependency", None))
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("unexpected error in %s", method.__name__)
                else:
                    log.info("%s -> %s: %s", method.__name__, code.name, message)
                await context.abort(code, message)

        return handler

    return wrap


def remaining(context: grpc.aio.ServicerContext, cap: float) -> float:
    """The timeout for a downstream call: ours, capped by what the caller gave us."""
    left = context.time_remaining()
    return cap if left is None else max(0.001, min(cap, left))


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
) -> None:
    """Run a grpc.aio server until SIGTERM/SIGINT (or `stop` is set), then drain.

    Health is NOT_SERVING until `ready()` says the service's dependencies answer,
    and is re-checked every `health_interval_seconds`.
    """
    services = list(services)
    opts = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=opts)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for s in services:
        s.add(s.servicer, server)
    names = [s.name for s in services]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{settings.host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind {settings.host}:{port}")

    async def set_all(status):
        for n in ["", *names]:
            await health_servicer.set(n, status)

    await set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("listening", extra={"address": f"{settings.host}:{bound}", "services": names})

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


def client_options(max_message_bytes: int = 64 * 1024 * 1024) -> list[tuple[str, object]]:
    # round_robin so a comma-free DNS name with several A records spreads load.
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.enable_retries", 1),
    ]


def run(coro_factory: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_factory())

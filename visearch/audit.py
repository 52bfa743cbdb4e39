"""The audit trail: one JSON line per ingest, delete, re-embed and admin call through the gateway.

    {"ts": "2025-01-31T09:14:03.127Z", "key": "shop-app", "action": "ingest", "method": "IngestItems",
     "catalog": "shop", "items": 16, "result": "OK", "request_id": "5f0c2a9e41d7b3c8", ...}

Refused calls of those actions (PERMISSION_DENIED, RESOURCE_EXHAUSTED, a bad request) are written
too, with the status code's name as the result and its message. A call is audited when its method
is in METHODS (so a call refused before its handler runs is named too) or when its handler checks
one of the audited actions (`visearch.auth.require`). Unauthenticated calls name no key and are
not written (the access log has them). Every gateway replica appends to the file with O_APPEND,
one write per line, so lines never interleave. docs/QUOTAS.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import grpc

from visearch import observability as obs
from visearch.auth import OPEN_PREFIXES, Authenticator, Unauthenticated, required

log = logging.getLogger(__name__)
# The gateway methods and the action each needs; a method not named here is audited when its
# handler requires one of ACTIONS.
METHODS = {"IngestItems": "ingest", "DeleteItems": "delete", "ReembedCatalog": "admin", "AdaptCatalog": "admin",
           "ExportCatalog": "admin", "ImportCatalog": "admin"}
ACTIONS = frozenset({"ingest", "delete", "admin"})
MAX_FIELD = 256  # characters of a caller's string (catalog, message) written


def timestamp(t: float) -> str:
    """UTC with milliseconds, as the JSON logs write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class AuditLog:
    """Appends JSON lines to a file, each with one write(2) on an O_APPEND descriptor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        try:
            # A local append of a few hundred bytes: cheaper inline than a thread hop.
            os.write(self.fd, line)
        except OSError as exc:  # a full disk must not fail the call, whose work is done
            log.error("cannot write the audit log %s: %s", self.path, exc)

    def close(self) -> None:
        os.close(self.fd)


def _clip(s: str) -> str:
    return s if len(s) <= MAX_FIELD else s[:MAX_FIELD] + "..."


def _count(request, response) -> int | None:
    """How many items a call names: the items of an ingest, the ids of a delete, else the `items`
    its answer counts (an import); None for the others."""
    fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
    for name in ("items", "item_ids"):
        if name in fields:
            return len(getattr(request, name))
    n = getattr(response, "items", None)
    return n if isinstance(n, int) else None


class _Call:
    """What one audited call asked for and how it ended."""

    def __init__(self, interceptor: AuditInterceptor, key: str, method: str, rid: str):
        self.i, self.key, self.method, self.rid = interceptor, key, method, rid
        self.asked: list[tuple[str, str | None]] = []
        self.request = self.response = None
        self.code, self.message = "OK", ""

    def begin(self, request) -> None:
        self.request = request
        # The call's own context: the handler's `require` calls land in self.asked.
        required.set(self.asked)
        if not obs.request_id.get():  # streaming calls: the in-flight limit (which sets it) wraps unary ones only
            obs.request_id.set(self.rid or obs.new_request_id())

    def failed(self, exc: BaseException, context) -> None:
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the caller went away
            self.code = "CANCELLED"
            return
        status = context.code()
        self.code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        self.message = context.details() or ""

    def end(self, context) -> None:
        checked = [(a, cat) for a, cat in self.asked if a in ACTIONS]
        action = self.i.methods.get(self.method) or (checked[0][0] if checked else None)
        if action is None:
            return
        try:
            self.i.audit.write(self.record(action, checked, context))
        except Exception:  # noqa: BLE001 - the call's answer stands; the miss is logged
            log.exception("audit record of %s not written", self.method)

    def record(self, action: str, checked, context) -> dict:
        request, response = self.request, self.response
        catalog = next((c for a, c in checked if a == action and c), None)
        if catalog is None and hasattr(request, "catalog"):
            catalog = request.catalog or "default"
        out = {"ts": timestamp(time.time()), "key": self.key, "action": action, "method": self.method,
               "catalog": _clip(catalog) if catalog is not None else None, "items": _count(request, response),
               "result": self.code, "request_id": obs.request_id.get() or self.rid}
        job_id = getattr(response, "job_id", "") or getattr(request, "job_id", "")
        if job_id:
            out["job_id"] = _clip(job_id)
        if self.message:
            m = self.message
            out["message"] = _clip(m if isinstance(m, str) else m.decode(errors="replace"))
        out["peer"] = context.peer()
        return out


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """Writes one audit line per audited call (unary or streaming), whatever it answered."""

    def __init__(self, audit: AuditLog, auth: Authenticator, methods: dict[str, str] | None = None):
        self.audit, self.auth = audit, auth
        self.methods = METHODS if methods is None else methods

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        try:
            key = self.auth.authenticate(details.invocation_metadata).id
        except Unauthenticated:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        rid = dict(details.invocation_metadata or ()).get("x-request-id", "")
        codec = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}

        if not handler.response_streaming:
            inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

            async def unary(request, context):
                call = _Call(self, key, method, rid)
                call.begin(None if handler.request_streaming else request)
                try:
                    call.response = await inner(request, context)
                    return call.response
                except BaseException as exc:
                    call.failed(exc, context)
                    raise
                finally:
                    call.end(context)

            make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
            return make(unary, **codec)

        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def streaming(request, context):
            call = _Call(self, key, method, rid)
            call.begin(None if handler.request_streaming else request)
            try:
                out = inner(request, context)
                if hasattr(out, "__aiter__"):
                    async for message in out:
                        yield message
                else:  # a handler that writes with context.write
                    await out
            except BaseException as exc:
                call.failed(exc, context)
                raise
            finally:
                call.end(context)

        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return make(streaming, **codec)


def audit_interceptor(path: str, auth: Authenticator) -> AuditInterceptor | None:
    """The gateway's audit trail into `path`, or None when no path is set."""
    if not path:
        return None
    log.info("audit trail on", extra={"audit_log": path})
    return AuditInterceptor(AuditLog(path), auth)

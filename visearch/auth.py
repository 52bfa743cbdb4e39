"""Who may do what: API keys in call metadata, and per-catalog grants.

Keys are stored hashed (sha256) in a JSON file:
  {"keys": [{"id": "admin", "sha256": "<hex>", "catalogs": ["*"], "actions": ["*"]},
            {"id": "shop-app", "sha256": "<hex>", "catalogs": ["shop", "shop_*"], "actions": ["search"],
             "rate": {"per_second": 20, "burst": 40}}]}
A key's optional "rate" caps its calls through the gateway (visearch/quota.py, docs/QUOTAS.md);
`"per_second": 0` exempts it from the gateway's default rate.
A caller sends `authorization: Bearer <key>` (or `x-api-key: <key>`). Services
behind the gateway accept the internal token (VISEARCH_INTERNAL_TOKEN), which
the gateway and the workers send. Health checks stay open so probes work.
"""

from __future__ import annotations

import contextvars
import fnmatch
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from visearch.errors import VisearchError

ACTIONS = ("search", "ingest", "read", "delete", "admin")
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class Unauthenticated(VisearchError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(VisearchError):
    code = grpc.StatusCode.PERMISSION_DENIED


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "vsk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Rate:
    """A token bucket: `per_second` calls on average, up to `burst` at once; per_second 0 is no limit."""

    per_second: float
    burst: float

    @property
    def limited(self) -> bool:
        return self.per_second > 0


def parse_rate(value, where: str) -> Rate | None:
    """The "rate" of a key entry ({"per_second": 20, "burst": 40}; burst defaults to max(1, per_second))."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"per_second", "burst"}:
        raise ValueError(f"{where}: rate must be {{\"per_second\": N, \"burst\": M}}, got {value!r}")
    try:
        per_second = float(value.get("per_second", 0))
        burst = float(value.get("burst") or max(1.0, per_second))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: rate values must be numbers, got {value!r}") from None
    if not (0 <= per_second < float("inf")) or (per_second > 0 and not 1 <= burst < float("inf")):
        raise ValueError(f"{where}: rate needs per_second >= 0 and burst >= 1, got {value!r}")
    return Rate(per_second, burst if per_second > 0 else 0.0)


@dataclass(frozen=True)
class Principal:
    id: str
    catalogs: tuple[str, ...] = ("*",)
    actions: tuple[str, ...] = ("*",)
    # None: the gateway's default rate (VISEARCH_RATE_PER_SECOND) applies.
    rate: Rate | None = None

    def may(self, action: str, catalog: str | None = None) -> bool:
        if "*" not in self.actions and action not in self.actions:
            return False
        return catalog is None or any(fnmatch.fnmatchcase(catalog, pat) for pat in self.catalogs)


INTERNAL = Principal("internal")
current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("visearch_principal", default=None)
# The grants a call's handler asked for (`require`), in order, when someone collects them: the audit
# trail (visearch/audit.py) names a call by the action its handler checked.
required: contextvars.ContextVar[list[tuple[str, str | None]] | None] = contextvars.ContextVar(
    "visearch_required", default=None)


@dataclass
class KeyStore:
    by_hash: dict[str, Principal] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read API keys from {path}: {exc}") from None
        store = cls()
        for k in data.get("keys", []):
            bad = [a for a in k.get("actions", ["*"]) if a != "*" and a not in ACTIONS]
            if bad:
                raise ValueError(f"key {k.get('id')!r}: unknown actions {bad} (known: {', '.join(ACTIONS)})")
            rate = parse_rate(k.get("rate"), f"key {k.get('id')!r}")
            store.by_hash[k["sha256"]] = Principal(k["id"], tuple(k.get("catalogs", ["*"])),
                                                   tuple(k.get("actions", ["*"])), rate)
        return store

    @staticmethod
    def write(path: Path, entries: list[dict]) -> None:
        """Write a key file readable by its owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": entries}, f, indent=2)


def key_from_metadata(metadata) -> str | None:
    for k, v in metadata or ():
        if k == "authorization" and v.lower().startswith("bearer "):
            return v[7:].strip()
        if k == "x-api-key":
            return v.strip()
    return None


class Authenticator:
    """Resolves a call's key to a principal; None settings mean 'auth disabled' (tests only)."""

    def __init__(self, keys: KeyStore | None, internal_token: str = "", enabled: bool = True):
        self.keys = keys or KeyStore()
        self.internal_hash = hash_key(internal_token) if internal_token else ""
        self.enabled = enabled

    def authenticate(self, metadata) -> Principal:
        if not self.enabled:
            return Principal("anonymous")
        key = key_from_metadata(metadata)
        if not key:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <api key>'")
        h = hash_key(key)
        if self.internal_hash and hmac.compare_digest(h, self.internal_hash):
            return INTERNAL
        principal = self.keys.by_hash.get(h)
        if principal is None:
            raise Unauthenticated("invalid API key")
        return principal


def require(action: str, catalog: str | None = None) -> Principal:
    """Raise PERMISSION_DENIED unless the current caller may do `action` on `catalog`."""
    asked = required.get()
    if asked is not None:
        asked.append((action, catalog))
    p = current.get()
    if p is None:
        raise Unauthenticated("no authenticated caller")
    if p is INTERNAL or p.id == "anonymous":
        return p
    if not p.may(action, catalog):
        where = f" on catalog {catalog!r}" if catalog else ""
        raise PermissionDenied(f"key {p.id!r} may not {action}{where}")
    return p


def readable(catalog: str) -> bool:
    """Whether the current caller may read the catalog's items and jobs (GetIngestJob's rule)."""
    p = current.get()
    return p is not None and (p is INTERNAL or p.id == "anonymous" or p.may("read", catalog))


def visible(catalog: str) -> bool:
    p = current.get()
    return p is not None and (p is INTERNAL or p.id == "anonymous" or p.may("read", catalog) or p.may("search", catalog))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without valid credentials (health checks excepted) before any handler runs."""

    def __init__(self, auth: Authenticator):
        self.auth = auth

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES) or not self.auth.enabled:
            return handler
        try:
            self.auth.authenticate(details.invocation_metadata)
        except Unauthenticated as exc:
            return _deny(handler, exc.message)
        return handler


def _deny(handler, message: str):
    return refuse(handler, grpc.StatusCode.UNAUTHENTICATED, message)


def refuse(handler, code: grpc.StatusCode, message: str, trailing_metadata=(), parse: bool = False):
    """A handler of the same kind as `handler` that answers `code` without running it. With `parse`
    the request is still decoded (so an interceptor around it can read what was asked); an
    unauthenticated caller's bytes are never parsed."""
    async def unary(request, context):
        await context.abort(code, message, trailing_metadata=tuple(trailing_metadata))

    async def streaming(request_iterator, context):
        await context.abort(code, message, trailing_metadata=tuple(trailing_metadata))
        yield  # pragma: no cover - makes this an async generator

    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer} if parse else {}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **codec)
    return grpc.unary_unary_rpc_method_handler(unary, **codec)


class TokenAuth(grpc.AuthMetadataPlugin):
    """Client side: attach a bearer key to every call."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, context, callback):
        callback((("authorization", f"Bearer {self.key}"),), None)


def call_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()

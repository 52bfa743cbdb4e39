"""Typed errors and their one mapping to gRPC status codes."""

from __future__ import annotations

import grpc


class ImageError(ValueError):
    """The bytes are not an image we accept; the message says why (raised by visearch.imaging)."""


class VisearchError(Exception):
    """An error a caller can act on; `code` is the gRPC status it maps to."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(VisearchError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(VisearchError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(VisearchError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(VisearchError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(VisearchError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(VisearchError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# A dependency's status passes through when the caller can act on it; anything
# else a dependency says becomes INTERNAL, since our caller sent nothing wrong.
_PASS_THROUGH = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


def to_status(exc: BaseException, dependency: str | None = None) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message for an exception raised while serving a call."""
    if isinstance(exc, VisearchError):
        return exc.code, exc.message
    if isinstance(exc, ImageError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if type(exc).__name__ == "MilvusException" and type(exc).__module__.startswith("pymilvus"):
        return grpc.StatusCode.UNAVAILABLE, f"vector store: {getattr(exc, 'message', exc)}"
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code, details = exc.code(), exc.details() or ""
        where = f"{dependency} service: " if dependency else "dependency: "
        if code in _PASS_THROUGH:
            return code, where + details
        return grpc.StatusCode.INTERNAL, where + f"{code.name}: {details}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"

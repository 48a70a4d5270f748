"""A2adError and its subclasses: each becomes a JSON (or JSON-RPC) error body."""

from __future__ import annotations

from typing import Any, ClassVar


class A2adError(Exception):
    """Base class: an error a2ad answers with a status, a stable code and a message."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # JSON-RPC code on the proxy path; -32000 is the implementation-defined server error.
    rpc_code: ClassVar[int] = -32000
    # HTTP status on the proxy path when it differs from `status`: there a
    # JSON-RPC-level error is HTTP 200 with the error in the body, as agents, the
    # a2a-sdk and the A2A conformance kit answer (SPEC, Errors: the proxy column).
    proxy_status: ClassVar[int | None] = None

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        self.retry_after = retry_after
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def rpc_body(self, rpc_id: Any) -> dict[str, Any]:
        error = {"code": self.rpc_code, "message": self.message, "data": {"code": self.code}}
        return {"jsonrpc": "2.0", "id": rpc_id, "error": error}


class ParseError(A2adError):
    """The body is not valid JSON."""

    status, code, rpc_code = 400, "parse_error", -32700
    proxy_status = 200


class InvalidRequest(A2adError):
    """The body is not a JSON-RPC 2.0 request."""

    status, code, rpc_code = 400, "invalid_request", -32600
    proxy_status = 200


class InvalidBody(A2adError):
    """The body does not have the fields this endpoint needs."""

    status, code, rpc_code = 400, "invalid_body", -32602


class InvalidParams(A2adError):
    """The request's params are not what the method takes."""

    # A JSON-RPC-level error, raised on the proxy path only: HTTP 200 with the
    # error in the body, as the agent itself would answer.
    status, code, rpc_code = 200, "invalid_params", -32602


class UnsupportedOperation(A2adError):
    """The A2A specification's UnsupportedOperationError: the task is already terminal."""

    status, code, rpc_code = 200, "unsupported_operation", -32004


class VersionNotSupported(A2adError):
    """The A2A specification's VersionNotSupportedError: the method belongs to
    another protocol version than the one the request's A2A-Version names."""

    status, code, rpc_code = 200, "version_not_supported", -32009


class InvalidHeader(A2adError):
    """A bad A2AD-* header value."""

    status, code, rpc_code = 400, "invalid_header", -32602


class Unauthorized(A2adError):
    """No token or an unknown token: send Authorization: Bearer <token>."""

    status, code = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="a2ad"'}


class Forbidden(A2adError):
    """This token is valid but not for this endpoint."""

    status, code = 403, "forbidden"


class NotFound(A2adError):
    """No such item."""

    status, code = 404, "not_found"


class UnknownWorkspace(A2adError):
    """No such workspace."""

    status, code = 404, "unknown_workspace"


class MethodNotAllowed(A2adError):
    """This path does not take that HTTP method."""

    status, code = 405, "method_not_allowed"


class Conflict(A2adError):
    """The action does not fit the current state."""

    status, code = 409, "conflict"


class BodyTooLarge(A2adError):
    """The request body is over server.max_body_bytes."""

    status, code, rpc_code = 413, "body_too_large", -32600


class RequestTimeout(A2adError):
    """The client did not send its whole body within server.client_timeout_seconds."""

    status, code, rpc_code = 408, "request_timeout", -32600


class QueueFull(A2adError):
    """A queue cap is reached; try again later."""

    status, code = 503, "queue_full"

    @classmethod
    def workspace(cls, workspace: str, cap: int) -> QueueFull:
        return cls(
            f"workspace {workspace!r} has {cap} items waiting"
            " (queue.max_depth_per_workspace); try again later",
            retry_after=5,
        )

    @classmethod
    def total(cls, cap: int) -> QueueFull:
        return cls(f"a2ad holds {cap} items (queue.max_depth); try again later", retry_after=5)


class StoreUnavailable(A2adError):
    """The store cannot write right now (disk full, I/O error or locked); try again later."""

    status, code = 503, "store_unavailable"


class CardUnavailable(A2adError):
    """The agent has not served its card yet."""

    status, code = 503, "card_unavailable"


class UpstreamTimeout(A2adError):
    """The agent did not answer in time."""

    status, code = 504, "upstream_timeout"


class UpstreamFailed(A2adError):
    """The agent could not be reached or gave no usable answer."""

    status, code = 502, "upstream_failed"

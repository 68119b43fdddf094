"""The podterm error tree.

Every error a peer can cause knows how to be reported: the WebSocket close
code, the HTTP status before an upgrade, and the audit outcome.  Code that
catches errors maps them at one boundary (the connection handler), never by
matching message text.

::

    PodtermError
    ├── ProtocolViolation      the peer broke a wire protocol (close 1002/1007/1009, HTTP 400)
    │   └── HandshakeError     a bad HTTP upgrade (HTTP 400/426/...)
    ├── LocalProtocolError     we misused a protocol object (a bug; close 1011)
    ├── AuthError              401 / 4401
    ├── ForbiddenError         403 / 4403
    ├── NotFoundError          404 / 4404
    ├── ConflictError          409 / 4409
    ├── GoneError              410 / 4410
    ├── RateLimitedError       429 / 4429
    ├── Unavailable            503 / 1013 (draining, at capacity, store down)
    ├── BadRequestError        400 / 1008
    ├── ConfigError            a bad flag, env var or file key (exit status 2)
    └── UpstreamError          the upstream failed (502 / 1011)
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes: RFC 6455 §7.4.1 plus podterm's application range."""

    NORMAL = 1000  # RFC 6455 §7.4.1: normal closure
    GOING_AWAY = 1001  # "an endpoint is going away, such as a server going down"
    PROTOCOL_ERROR = 1002  # "terminating the connection due to a protocol error"
    UNSUPPORTED_DATA = 1003  # "received a type of data it cannot accept"
    NO_STATUS = 1005  # reserved: never sent, reported when a CLOSE had no code
    ABNORMAL = 1006  # reserved: never sent, the connection dropped without CLOSE
    INVALID_PAYLOAD = 1007  # "data within a message that was not consistent with the type"
    POLICY_VIOLATION = 1008  # "received a message that violates its policy"
    MESSAGE_TOO_BIG = 1009  # "received a message that is too big for it to process"
    MANDATORY_EXTENSION = 1010  # client expected an extension the server did not negotiate
    INTERNAL_ERROR = 1011  # "encountered an unexpected condition"
    SERVICE_RESTART = 1012  # IANA registry
    TRY_AGAIN_LATER = 1013  # IANA registry
    BAD_GATEWAY = 1014  # IANA registry
    # podterm application codes (spec/podterm-protocol.md, "Close codes")
    UNAUTHENTICATED = 4401
    FORBIDDEN = 4403
    NO_SUCH_SESSION = 4404
    WRITER_EXISTS = 4409
    SESSION_ENDED = 4410
    RATE_LIMITED = 4429


class PodtermError(Exception):
    """Base of every podterm error.

    Attributes:
        close_code: WebSocket close code to send when this ends a connection.
        http_status: HTTP status to answer with before an upgrade.
        outcome: audit outcome string.
    """

    close_code: int = CloseCode.INTERNAL_ERROR
    http_status: int = 500
    outcome: str = "error"
    reason_name: str = "InternalError"  # Kubernetes Status.reason

    def __init__(self, message: str = "", *, close_code: int | None = None,
                 http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if close_code is not None:
            self.close_code = close_code
        if http_status is not None:
            self.http_status = http_status


class ProtocolViolation(PodtermError):
    """The remote peer broke a wire protocol.

    ``close_code`` is the RFC 6455 code the connection must be closed with
    (1002 protocol error, 1007 invalid payload, 1009 too big, ...).
    ``partial`` holds the events a parser completed, in the same call, before
    it met the violation: they are valid and must still be processed.
    """

    close_code = CloseCode.PROTOCOL_ERROR
    http_status = 400
    outcome = "rejected"
    reason_name = "BadRequest"

    def __init__(self, message: str, close_code: int = CloseCode.PROTOCOL_ERROR,
                 *, http_status: int | None = None, partial: list | None = None) -> None:  # type: ignore[type-arg]
        super().__init__(message, close_code=close_code, http_status=http_status)
        self.partial: list = partial if partial is not None else []  # type: ignore[type-arg]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ProtocolViolation) and type(self) is type(other)
                and self.close_code == other.close_code and self.message == other.message)

    def __hash__(self) -> int:
        return hash((type(self), self.close_code, self.message))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {int(self.close_code)})"


class HandshakeError(ProtocolViolation):
    """A bad HTTP/1.1 WebSocket upgrade; answered with ``http_status``."""

    def __init__(self, message: str, http_status: int = 400,
                 *, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message, CloseCode.PROTOCOL_ERROR, http_status=http_status)
        self.headers = headers or []


class LocalProtocolError(PodtermError):
    """We tried to do something the protocol forbids in the current state (a bug)."""


class AuthError(PodtermError):
    close_code = CloseCode.UNAUTHENTICATED
    http_status = 401
    outcome = "denied"
    reason_name = "Unauthorized"


class ForbiddenError(PodtermError):
    close_code = CloseCode.FORBIDDEN
    http_status = 403
    outcome = "denied"
    reason_name = "Forbidden"


class NotFoundError(PodtermError):
    close_code = CloseCode.NO_SUCH_SESSION
    http_status = 404
    outcome = "rejected"
    reason_name = "NotFound"


class ConflictError(PodtermError):
    close_code = CloseCode.WRITER_EXISTS
    http_status = 409
    outcome = "rejected"
    reason_name = "Conflict"


class GoneError(PodtermError):
    close_code = CloseCode.SESSION_ENDED
    http_status = 410
    outcome = "rejected"
    reason_name = "Gone"


class RateLimitedError(PodtermError):
    close_code = CloseCode.RATE_LIMITED
    http_status = 429
    outcome = "rejected"
    reason_name = "TooManyRequests"


class Unavailable(PodtermError):
    """docs/protocol.md §2 ``unavailable`` (503): draining, at capacity, or the store is down.

    The close code is 1013 "try again later": the client should reconnect, and
    through a load balancer it will reach a peer that can serve it.
    """

    close_code = CloseCode.TRY_AGAIN_LATER
    http_status = 503
    outcome = "rejected"
    reason_name = "ServiceUnavailable"


class BadRequestError(PodtermError):
    close_code = CloseCode.POLICY_VIOLATION
    http_status = 400
    outcome = "rejected"
    reason_name = "BadRequest"


class ConfigError(PodtermError):
    """A bad flag, environment variable or config-file key; exit status 2."""

    http_status = 500
    reason_name = "InternalError"


class UpstreamError(PodtermError):
    close_code = CloseCode.INTERNAL_ERROR
    http_status = 502
    outcome = "error"
    reason_name = "ServiceUnavailable"

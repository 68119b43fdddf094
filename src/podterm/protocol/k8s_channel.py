"""Kubernetes exec/attach channel protocol over WebSocket, server and client roles.

Spec: ``shared/spec/k8s-exec-protocol.md`` (section numbers below refer to it).
This layer sits above the WebSocket codec: its input is whole messages as
``(opcode, payload)`` from :class:`~podterm.protocol.frame.FrameReader`, its
output is ``(prefix, payload)`` pairs for
:func:`~podterm.protocol.codec.encode_message`, sent with the opcode in the
channel object's ``opcode`` attribute (binary for the raw variants, text for
the base64 ones).  Sans-IO: no sockets, no clocks.

Subprotocols (§3.4, §4)::

    v5.channel.k8s.io         raw, JSON Status on channel 3, CLOSE signal FF nn
    v4.channel.k8s.io         raw, JSON Status on channel 3
    v4.base64.channel.k8s.io  text, '0'+channel then base64(payload), JSON Status
    channel.k8s.io            raw, plain-text error on channel 3, nothing on success
    base64.channel.k8s.io     text + base64, plain-text error on channel 3

Server role (:class:`K8sServerChannel`, the gateway standing in for kube-apiserver):

* channel 0 (stdin) → :class:`Stdin`, from text **or** binary messages (the
  Python client writes ``str`` as text, §4.1); an empty payload is dropped;
* channel 4 (resize) → :class:`Resize`, decoded as a *stream* of concatenated
  JSON objects (§6): keys matched case-insensitively, unknown keys ignored,
  a zero width or height dropped, one value bounded by ``max_resize_bytes``;
* v5 only: ``FF 00`` → :class:`StdinClose` (once; repeats are ignored, as the
  real server's close is idempotent).  ``FF nn`` for another channel of the
  fixed table (1-4) is accepted and ignored, as kube-apiserver does (§4.7:
  only "a channel that does not exist" is an error); after ``FF 04`` resize
  messages are ignored.  Any other length, or nn > 4: ProtocolViolation 1002;
* an empty message, a message for a channel the client may not write (1-3),
  or was not granted (stdin/tty not requested), or already closed: ignored
  and counted in :meth:`statistics`; channel ids outside the table: ignored
  and counted separately (§7.5);
* base64 variants: the channel is ``byte - ord('0')``; the payload is standard
  padded base64 (CR/LF skipped, as Go's decoder does); invalid base64 → 1007.

Server encoding: ``stdout``/``stderr``/``ready_message``/``status_*``.  The
status bytes are exactly what kube-apiserver writes (§5.1): compact JSON, Go
field order, ``omitempty`` semantics, and Go's HTML escaping of ``<``, ``>``,
``&``.  A server never emits CLOSE signals (§7.4: kubectl prints "Unknown
stream id 255" for each).

Client role (:class:`K8sClientChannel`, the gateway dialing a real apiserver):
encodes stdin, resize (kubectl's exact bytes ``{"Width":W,"Height":H}\\n``)
and the v5 stdin close; decodes stdout/stderr/status; concatenates channel 3
until the connection ends and maps it to an exit code exactly as client-go
does (:func:`exit_code_from_status`, §5.2).

Errors: :class:`~podterm.errors.ProtocolViolation` with the close code
(1002 bad layout, 1003 wrong message type, 1007 bad JSON/UTF-8/base64, 1009
too big).  A remote command that failed for a reason other than its exit code
raises :class:`K8sStatusError` from :meth:`K8sClientChannel.exit_code`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, TypeAlias

from podterm.errors import CloseCode, LocalProtocolError, ProtocolViolation, UpstreamError
from podterm.protocol._types import Buffer
from podterm.protocol.events import Resize, StatusChunk, Stderr, Stdin, StdinClose, Stdout

OP_TEXT: Final = 0x1  # RFC 6455 §5.2 opcodes (same values as podterm.protocol.frame)
OP_BINARY: Final = 0x2

# --- subprotocols (§3.4) --------------------------------------------------------------------

V5_CHANNEL: Final = "v5.channel.k8s.io"
V4_CHANNEL: Final = "v4.channel.k8s.io"
V4_BASE64_CHANNEL: Final = "v4.base64.channel.k8s.io"
CHANNEL: Final = "channel.k8s.io"
BASE64_CHANNEL: Final = "base64.channel.k8s.io"

#: Every subprotocol podterm speaks, most preferred first (§3.4 "podterm server policy").
SUBPROTOCOLS: Final[tuple[str, ...]] = (
    V5_CHANNEL, V4_CHANNEL, V4_BASE64_CHANNEL, CHANNEL, BASE64_CHANNEL,
)
_BASE64_VARIANTS: Final = frozenset({V4_BASE64_CHANNEL, BASE64_CHANNEL})
_JSON_STATUS_VARIANTS: Final = frozenset({V5_CHANNEL, V4_CHANNEL, V4_BASE64_CHANNEL})


def negotiate(offered: Iterable[str], supported: Iterable[str] = SUBPROTOCOLS) -> str | None:
    """Pick the subprotocol to answer with, or None if there is no common one.

    The server's preference decides, not the client's order: v5 > v4 >
    v4.base64 > channel > base64 (§3.4; kube-apiserver ≥ 1.30 picks v5 whenever
    it is offered).  ``offered`` items are stripped of surrounding spaces, so a
    header split on ``,`` can be passed as is.  An empty offer gives None: a
    kubelet would treat it as ``channel.k8s.io``, podterm answers 400 (§3.4).
    """
    offer = {item.strip() for item in offered}
    allowed = set(supported)
    for name in SUBPROTOCOLS:
        if name in offer and name in allowed:
            return name
    return None


class Channel(IntEnum):
    """Channel ids (§4.2).  The table is fixed; unrequested streams carry nothing."""

    STDIN = 0  # client → server, raw bytes
    STDOUT = 1  # server → client
    STDERR = 2  # server → client (absent with a tty)
    ERROR = 3  # server → client: v4/v5 JSON Status, v1 error text
    RESIZE = 4  # client → server: JSON terminal size, tty only
    CLOSE = 255  # v5 only: "FF nn" = channel nn is finished (not a channel)


_MAX_CHANNEL: Final = Channel.RESIZE  # highest id in the table; FF nn with nn above is an error

# --- limits ----------------------------------------------------------------------------------

#: One resize JSON value.  kubectl's is 25 bytes; 4 KiB leaves room for
#: unknown keys from other clients while bounding what a peer can make us hold.
DEFAULT_MAX_RESIZE_BYTES: Final = 4096
#: Channel 3 concatenation (client role).  A real Status is < 1 KiB; 64 KiB
#: fits any error message a runtime writes.
DEFAULT_MAX_STATUS_BYTES: Final = 64 * 1024
_MAX_JSON_DEPTH: Final = 32  # nesting allowed inside a resize value (json recursion guard)

# --- errors ----------------------------------------------------------------------------------

E_CLOSE_LENGTH = "v5 CLOSE signal must be exactly 2 bytes"
E_CLOSE_CHANNEL = "v5 CLOSE signal for channel {} which does not exist"
E_BASE64 = "invalid base64 payload on channel {}"
E_RESIZE_JSON = "invalid resize JSON: {}"
E_RESIZE_BIG = "resize JSON value larger than {} bytes"
E_TEXT_FROM_SERVER = "text message from a raw channel.k8s.io server"
E_STATUS_BIG = "status on channel 3 larger than {} bytes"
E_STATUS_PROTO = "error stream protocol error: {}"


class K8sStatusError(UpstreamError):
    """The remote command failed with a Kubernetes ``Status`` that is not an exit code.

    ``message`` is the Status message (shown to the user as ``error: <message>``
    by kubectl), ``reason`` its machine reason (``InternalError``, ``NotFound``,
    ...), ``code`` its HTTP-like code (0 if absent).
    """

    def __init__(self, message: str, *, reason: str = "", code: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


def _violation(message: str, code: int) -> ProtocolViolation:
    return ProtocolViolation(message, code)


OutMessage: TypeAlias = tuple[bytes, Buffer]
"""``(prefix, payload)`` for ``encode_message(prefix, payload, opcode=channel.opcode)``."""

ServerEvent: TypeAlias = Stdin | StdinClose | Resize
ClientEvent: TypeAlias = Stdout | Stderr | StatusChunk


@dataclass(frozen=True, slots=True)
class K8sChannelStatistics:
    """Counters of one channel connection (a snapshot)."""

    messages: int  # data messages received
    ignored: int  # empty, wrong-direction, unrequested or after-close messages
    unknown_channel: int  # channel id outside the table (§7.5)
    resizes_dropped: int  # resize values with a zero width or height


# --- JSON helpers ----------------------------------------------------------------------------


def _go_json(obj: Any) -> bytes:
    """Compact JSON as Go's ``encoding/json`` writes it (key order as given).

    Go escapes ``<``, ``>``, ``&`` and U+2028/U+2029 inside strings (HTML safety);
    those characters cannot appear outside strings in JSON, so a plain replace
    is exact.  Non-ASCII text stays UTF-8, as in Go.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    text = (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    return text.encode("utf-8", "replace")


class _Obj(list[tuple[str, Any]]):
    """A JSON object as its ``(key, value)`` pairs in document order, duplicates kept.

    Go's decoder assigns every key in order (the last one wins) and matches field
    names case-insensitively; keeping the pairs lets us do the same.
    """

    __slots__ = ()


_MISSING: Final = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    """``json.loads`` keeping object pairs and rejecting NaN/Infinity (Go does)."""
    return json.loads(text, object_pairs_hook=_Obj, parse_constant=_reject_constant)


def _field(obj: _Obj, name: str) -> Any:
    """Go struct-field lookup: the last key equal to ``name`` ignoring case, else _MISSING."""
    want = name.lower()
    found: Any = _MISSING
    for key, value in obj:
        if key.lower() == want:
            found = value
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- resize stream decoder (§6) --------------------------------------------------------------

_WS: Final = b" \t\r\n"  # RFC 8259 §2 whitespace


class _ResizeStream:
    """Channel 4 as the real server reads it: concatenated JSON values, any framing.

    Objects may span messages and several may share one; whitespace between them
    is skipped.  Each complete object is parsed like Go's ``json.Decoder`` into
    ``TerminalSize{Width, Height uint16}``: keys case-insensitive, unknown keys
    ignored, ``null`` leaves a field at 0, a non-integer or out-of-range value is
    an error.
    """

    __slots__ = ("_buf", "_limit", "dropped")

    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit
        self.dropped = 0

    def feed(self, data: Buffer) -> list[Resize]:
        """Append ``data``; return every size completed (a violation keeps them in ``partial``)."""
        self._buf += data
        out: list[Resize] = []
        try:
            self._extract(out)
        except ProtocolViolation as exc:
            exc.partial = list(out)
            raise
        return out

    def _extract(self, out: list[Resize]) -> None:
        buf = self._buf
        pos = 0
        n = len(buf)
        while True:
            while pos < n and buf[pos] in _WS:
                pos += 1
            if pos >= n:
                break
            if buf[pos] != 0x7B:  # '{'
                raise _violation(E_RESIZE_JSON.format("expected an object"),
                                 CloseCode.INVALID_PAYLOAD)
            end = self._scan(buf, pos)
            if end < 0:  # incomplete: wait for more, within the bound
                if n - pos > self._limit:
                    raise _violation(E_RESIZE_BIG.format(self._limit), CloseCode.MESSAGE_TOO_BIG)
                break
            if end - pos > self._limit:
                raise _violation(E_RESIZE_BIG.format(self._limit), CloseCode.MESSAGE_TOO_BIG)
            size = self._parse(bytes(buf[pos:end]))
            pos = end
            if size is not None:
                out.append(size)
        del buf[:pos]

    def _scan(self, buf: bytearray, start: int) -> int:
        """End index of the object starting at ``start``, or -1 if it is incomplete.

        Only brackets and strings are tracked; the slice is validated by the JSON
        parser afterwards.  Bytes ≥ 0x80 never equal an ASCII delimiter, so a
        UTF-8 character split across messages is harmless here.
        """
        depth = 0
        in_string = False
        escaped = False
        limit = start + self._limit + 1
        for i in range(start, min(len(buf), limit)):
            c = buf[i]
            if in_string:
                if escaped:
                    escaped = False
                elif c == 0x5C:  # backslash
                    escaped = True
                elif c == 0x22:  # quote
                    in_string = False
            elif c == 0x22:
                in_string = True
            elif c == 0x7B or c == 0x5B:  # { [
                depth += 1
                if depth > _MAX_JSON_DEPTH:
                    raise _violation(E_RESIZE_JSON.format("nested too deeply"),
                                     CloseCode.INVALID_PAYLOAD)
            elif c == 0x7D or c == 0x5D:  # } ]
                depth -= 1
                if depth == 0:
                    return i + 1
        return -1

    def _parse(self, raw: bytes) -> Resize | None:
        try:
            obj = _loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise _violation(E_RESIZE_JSON.format(type(exc).__name__),
                             CloseCode.INVALID_PAYLOAD) from None
        if not isinstance(obj, _Obj):
            raise _violation(E_RESIZE_JSON.format("expected an object"), CloseCode.INVALID_PAYLOAD)
        width = height = 0
        for key, value in obj:
            folded = key.lower()
            if folded not in ("width", "height") or value is None:
                continue  # unknown keys are ignored; null leaves the field alone (Go)
            if not _is_int(value) or not 0 <= value <= 0xFFFF:
                raise _violation(E_RESIZE_JSON.format(f"{key} is not a uint16"),
                                 CloseCode.INVALID_PAYLOAD)
            if folded == "width":
                width = value
            else:
                height = value
        if width == 0 or height == 0:
            self.dropped += 1  # a zero-sized terminal is never applied (§6)
            return None
        return Resize(cols=width, rows=height)


# --- Status JSON (§5.1, §9) ------------------------------------------------------------------

#: Status reasons and cause types used by the remote-command protocol
#: (apimachinery ``pkg/util/remotecommand/constants.go``).
REASON_NON_ZERO_EXIT: Final = "NonZeroExitCode"
CAUSE_EXIT_CODE: Final = "ExitCode"

# metav1.StatusDetails and StatusCause field order (Go struct order = JSON order).
_DETAILS_KEYS: Final = ("name", "group", "kind", "uid", "causes", "retryAfterSeconds")
_CAUSE_KEYS: Final = ("reason", "message", "field")


def _details(details: Mapping[str, Any]) -> dict[str, Any]:
    """StatusDetails in Go's order with ``omitempty``; unknown keys are a caller bug."""
    unknown = set(details) - set(_DETAILS_KEYS)
    if unknown:
        raise ValueError(f"unknown StatusDetails keys: {sorted(unknown)}")
    out: dict[str, Any] = {}
    for key in _DETAILS_KEYS:
        value = details.get(key)
        if not value:
            continue
        if key == "causes":
            causes = []
            for cause in value:
                bad = set(cause) - set(_CAUSE_KEYS)
                if bad:
                    raise ValueError(f"unknown StatusCause keys: {sorted(bad)}")
                causes.append({k: cause[k] for k in _CAUSE_KEYS if cause.get(k)})
            value = causes
        out[key] = value
    return out


def _status(status: str, *, message: str = "", reason: str = "",
            details: Mapping[str, Any] | None = None, code: int = 0,
            typed: bool = False) -> bytes:
    """metav1.Status as Go marshals it: TypeMeta (omitempty), metadata, then omitempty fields."""
    obj: dict[str, Any] = {}
    if typed:
        obj["kind"] = "Status"
        obj["apiVersion"] = "v1"
    obj["metadata"] = {}
    obj["status"] = status
    if message:
        obj["message"] = message
    if reason:
        obj["reason"] = reason
    if details:
        d = _details(details)
        if d:
            obj["details"] = d
    if code:
        obj["code"] = code
    return _go_json(obj)


def status_success_json() -> bytes:
    """``{"metadata":{},"status":"Success"}`` (§5.1)."""
    return _status("Success")


def exit_message(code: int) -> str:
    """The Status message kube-apiserver writes for exit code ``code`` (§5.1)."""
    return ("command terminated with non-zero exit code: "
            f"command terminated with exit code {code}")


def status_exit_code_json(code: int) -> bytes:
    """The channel-3 Status for exit code ``code``: Success for 0, NonZeroExitCode otherwise.

    Raises:
        ValueError: ``code`` outside 0..255 (client-go rejects such a code, §5.2).
    """
    if not _is_int(code) or not 0 <= code <= 255:
        raise ValueError(f"exit code {code!r} outside 0..255")
    if code == 0:
        return status_success_json()
    return _status("Failure", message=exit_message(code), reason=REASON_NON_ZERO_EXIT,
                   details={"causes": [{"reason": CAUSE_EXIT_CODE, "message": str(code)}]})


def status_failure_json(message: str, reason: str, code: int = 0,
                        details: Mapping[str, Any] | None = None) -> bytes:
    """A Failure Status without kind/apiVersion (after the upgrade, §5.1, §7.3)."""
    return _status("Failure", message=message, reason=reason, details=details, code=code)


def status_internal_error_json(text: str) -> bytes:
    """The InternalError Status a real server writes after the upgrade (§5.1, third example)."""
    return status_failure_json(f"Internal error occurred: {text}", "InternalError", 500,
                               {"causes": [{"message": text}]})


def status_json(http_code: int, reason: str, message: str,
                details: Mapping[str, Any] | None = None) -> bytes:
    """Body of a pre-upgrade error answer, **with** kind/apiVersion (§9, §2.3).

    ``status`` is ``Success`` for a 2xx ``http_code`` and ``Failure`` otherwise.
    ``details`` keys are StatusDetails fields (``name``, ``kind``, ``causes``...),
    written in Go's order.
    """
    status = "Success" if 200 <= http_code < 300 else "Failure"
    return _status(status, message=message, reason=reason, details=details, code=http_code,
                   typed=True)


# --- decoding a channel-3 Status (§5.2) ------------------------------------------------------


def _status_proto(what: str, code: int = CloseCode.PROTOCOL_ERROR) -> ProtocolViolation:
    return _violation(E_STATUS_PROTO.format(what), code)


def _want_str(obj: _Obj, name: str) -> str:
    value = _field(obj, name)
    if value is _MISSING or value is None:
        return ""
    if not isinstance(value, str):
        raise _status_proto(f"{name} is not a string", CloseCode.INVALID_PAYLOAD)
    return value


def _want_obj(obj: _Obj, name: str) -> _Obj | None:
    value = _field(obj, name)
    if value is _MISSING or value is None:
        return None
    if not isinstance(value, _Obj):
        raise _status_proto(f"{name} is not an object", CloseCode.INVALID_PAYLOAD)
    return value


def _parse_status(data: bytes) -> _Obj:
    try:
        obj = _loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _status_proto("status is not JSON", CloseCode.INVALID_PAYLOAD) from None
    if obj is None:
        return _Obj()  # Go: unmarshaling null leaves a zero Status ("unknown error" below)
    if not isinstance(obj, _Obj):
        raise _status_proto("status is not an object", CloseCode.INVALID_PAYLOAD)
    # Type-check the fields Go would reject (json.Unmarshal fails on a type mismatch).
    for name in ("kind", "apiVersion", "status", "message", "reason"):
        _want_str(obj, name)
    _want_obj(obj, "metadata")
    code = _field(obj, "code")
    if code is not _MISSING and code is not None and (
            not _is_int(code) or not -(2**31) <= code < 2**31):
        raise _status_proto("code is not an int32", CloseCode.INVALID_PAYLOAD)
    return obj


def _causes(details: _Obj) -> list[_Obj]:
    causes = _field(details, "causes")
    if causes is _MISSING or causes is None:
        return []
    if not isinstance(causes, list) or isinstance(causes, _Obj):
        raise _status_proto("details.causes is not a list", CloseCode.INVALID_PAYLOAD)
    out: list[_Obj] = []
    for cause in causes:
        if cause is None:
            cause = _Obj()
        if not isinstance(cause, _Obj):
            raise _status_proto("a cause is not an object", CloseCode.INVALID_PAYLOAD)
        for name in ("reason", "message", "field"):
            _want_str(cause, name)
        out.append(cause)
    return out


def exit_code_from_status(data: Buffer) -> int:
    """Map the concatenated channel-3 bytes of a v4/v5 session to an exit code (§5.2).

    Mirrors client-go's ``errorDecoderV4``:

    * nothing at all → 0 (silence means success);
    * ``Success`` → 0;
    * ``Failure`` + reason ``NonZeroExitCode`` → the first cause whose reason
      is ``ExitCode``, its message parsed as a decimal 0..255;
    * any other ``Failure`` → :class:`K8sStatusError` with its message, reason
      and code.

    Raises:
        K8sStatusError: the command failed without an exit code.
        ProtocolViolation: not a Status (1007), or a NonZeroExitCode without
            details, without an ExitCode cause or with an invalid code (1002).
            client-go calls these "error stream protocol error".
    """
    raw = bytes(data)
    if not raw:
        return 0
    obj = _parse_status(raw)
    status = _want_str(obj, "status")
    if status == "Success":
        return 0
    if status != "Failure":
        raise _status_proto("unknown error")
    reason = _want_str(obj, "reason")
    if reason == REASON_NON_ZERO_EXIT:
        details = _want_obj(obj, "details")
        if details is None:
            raise _status_proto("details must be set")
        for cause in _causes(details):
            if _want_str(cause, "reason") != CAUSE_EXIT_CODE:
                continue
            text = _want_str(cause, "message")
            # strconv.ParseUint(text, 10, 8): ASCII digits only, at most 255.
            if not (text.isascii() and text.isdigit()) or int(text) > 255:
                raise _status_proto(f"invalid exit code value {text!r}")
            return int(text)
        raise _status_proto(f"no {CAUSE_EXIT_CODE} cause given")
    code = _field(obj, "code")
    raise K8sStatusError(_want_str(obj, "message"), reason=reason,
                         code=code if _is_int(code) else 0)


# --- the two roles ---------------------------------------------------------------------------


class _ChannelBase:
    __slots__ = ("subprotocol", "opcode", "_base64", "_v5", "_json_status",
                 "_messages", "_ignored", "_unknown")

    def __init__(self, subprotocol: str) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(f"unsupported subprotocol {subprotocol!r}")
        self.subprotocol = subprotocol
        self._base64 = subprotocol in _BASE64_VARIANTS
        self._v5 = subprotocol == V5_CHANNEL
        self._json_status = subprotocol in _JSON_STATUS_VARIANTS
        #: The WebSocket opcode every message this side sends must use (§4.1, §4.5).
        self.opcode: int = OP_TEXT if self._base64 else OP_BINARY
        self._messages = 0
        self._ignored = 0
        self._unknown = 0

    @property
    def supports_stdin_close(self) -> bool:
        """True for ``v5.channel.k8s.io``, the only variant with the CLOSE signal (§4.7)."""
        return self._v5

    @property
    def has_json_status(self) -> bool:
        """True when channel 3 carries a JSON Status (v4, v5, v4.base64); else error text."""
        return self._json_status

    def _encode(self, channel: int, data: Buffer) -> OutMessage:
        if self._base64:
            return bytes((0x30 + channel,)), base64.b64encode(data)
        return bytes((channel,)), data

    def _decode_payload(self, channel: int, payload: Buffer) -> bytes:
        """The payload after the channel byte: sliced once, base64-decoded if needed."""
        body = payload[1:]
        if self._base64:
            raw = bytes(body)
            if b"\r" in raw or b"\n" in raw:  # Go's base64 decoder skips CR and LF
                raw = raw.replace(b"\r", b"").replace(b"\n", b"")
            try:
                return base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise _violation(E_BASE64.format(channel), CloseCode.INVALID_PAYLOAD) from None
        return body if isinstance(body, bytes) else bytes(body)

    def _check_opcode(self, opcode: int) -> None:
        if opcode != OP_TEXT and opcode != OP_BINARY:
            raise LocalProtocolError(f"opcode {opcode} is not a data message")

    def _stats(self, dropped: int) -> K8sChannelStatistics:
        return K8sChannelStatistics(messages=self._messages, ignored=self._ignored,
                                    unknown_channel=self._unknown, resizes_dropped=dropped)


class K8sServerChannel(_ChannelBase):
    """The server side of one exec/attach connection (the gateway as kube-apiserver).

    Args:
        subprotocol: the negotiated subprotocol (one of :data:`SUBPROTOCOLS`).
        stdin: the client asked for stdin; otherwise channel 0 is ignored.
        tty: the session has a terminal; otherwise channel 4 is ignored (§6:
            kubectl opens the resize stream only for a tty).
        max_resize_bytes: bound of one resize JSON value (1009 beyond it).

    See the module docstring for what each message becomes.
    """

    __slots__ = ("stdin", "tty", "_resize", "_stdin_closed", "_resize_closed")

    def __init__(self, subprotocol: str, *, stdin: bool = True, tty: bool = True,
                 max_resize_bytes: int = DEFAULT_MAX_RESIZE_BYTES) -> None:
        super().__init__(subprotocol)
        self.stdin = stdin
        self.tty = tty
        self._resize = _ResizeStream(max_resize_bytes)
        self._stdin_closed = False
        self._resize_closed = False

    def __repr__(self) -> str:
        return (f"<K8sServerChannel {self.subprotocol} stdin={'closed' if self._stdin_closed else self.stdin}"
                f" tty={self.tty} messages={self._messages}>")

    @property
    def stdin_closed(self) -> bool:
        return self._stdin_closed

    def statistics(self) -> K8sChannelStatistics:
        return self._stats(self._resize.dropped)

    def receive_message(self, opcode: int, payload: Buffer) -> list[ServerEvent]:
        """Decode one whole client message.

        Returns:
            zero or more events, in order (a resize message may hold several sizes,
            or only part of one).

        Raises:
            ProtocolViolation: malformed v5 CLOSE signal (1002), invalid base64 or
                resize JSON (1007), resize value too big (1009).
            LocalProtocolError: ``opcode`` is not text or binary (a caller bug).
        """
        self._check_opcode(opcode)
        n = len(payload)
        if n == 0:
            self._ignored += 1  # §4.1: servers ignore zero-length messages
            return []
        self._messages += 1
        first = payload[0]
        if self._v5 and first == Channel.CLOSE:
            return self._close_signal(payload)
        channel = (first - 0x30) & 0xFF if self._base64 else first
        if channel == Channel.STDIN:
            if not self.stdin or self._stdin_closed:
                self._ignored += 1
                return []
            data = self._decode_payload(channel, payload)
            if not data:
                self._ignored += 1
                return []
            return [Stdin(data)]
        if channel == Channel.RESIZE:
            if not self.tty or self._resize_closed:
                self._ignored += 1
                return []
            sizes: list[ServerEvent] = []
            sizes.extend(self._resize.feed(self._decode_payload(channel, payload)))
            return sizes
        if channel > _MAX_CHANNEL:
            self._unknown += 1  # §7.5: ignore and count, never fail the session
        else:
            self._ignored += 1  # an output channel written by the client: nothing to do
        return []

    def _close_signal(self, payload: Buffer) -> list[ServerEvent]:
        if len(payload) != 2:
            raise _violation(E_CLOSE_LENGTH, CloseCode.PROTOCOL_ERROR)
        channel = payload[1]
        if channel > _MAX_CHANNEL:
            raise _violation(E_CLOSE_CHANNEL.format(channel), CloseCode.PROTOCOL_ERROR)
        if channel == Channel.STDIN:
            if self._stdin_closed or not self.stdin:
                self._ignored += 1  # the real server's Close is idempotent
                return []
            self._stdin_closed = True
            return [StdinClose()]
        if channel == Channel.RESIZE:
            self._resize_closed = True
        self._ignored += 1
        return []

    # -- encoding ---------------------------------------------------------------------------

    def stdout(self, data: Buffer) -> OutMessage:
        """A stdout message: ``01`` + data (raw) or ``1`` + base64 (text)."""
        return self._encode(Channel.STDOUT, data)

    def stderr(self, data: Buffer) -> OutMessage:
        """A stderr message: ``02`` + data (raw) or ``2`` + base64 (text)."""
        return self._encode(Channel.STDERR, data)

    def ready_message(self, *, stdout: bool = True, stderr: bool = False) -> OutMessage:
        """The empty "streams ready" message on the lowest requested output channel.

        Channel 1 if stdout was requested, else 2 if stderr was, else 3 (the
        error channel always exists), as the real servers do (§1, §11).
        """
        channel = Channel.STDOUT if stdout else Channel.STDERR if stderr else Channel.ERROR
        return self._encode(channel, b"")

    def _status_message(self, json_body: bytes, text: str | None) -> OutMessage | None:
        if self._json_status:
            return self._encode(Channel.ERROR, json_body)
        if text is None:
            return None  # v1: success writes nothing on channel 3 (§4.4)
        return self._encode(Channel.ERROR, text.encode("utf-8", "replace"))

    def status_success(self) -> OutMessage | None:
        """Channel 3 ``{"metadata":{},"status":"Success"}``; None for v1 (nothing is sent)."""
        return self._status_message(status_success_json(), None)

    def status_exit_code(self, code: int) -> OutMessage | None:
        """Channel 3 status for exit code ``code`` (Success for 0).

        v1 variants carry the Status message as plain text (kubelet's v1 status
        writer), and nothing for 0.

        Raises:
            ValueError: ``code`` outside 0..255.
        """
        body = status_exit_code_json(code)
        return self._status_message(body, exit_message(code) if code else None)

    def status_failure(self, message: str, reason: str, code: int = 0,
                       details: Mapping[str, Any] | None = None) -> OutMessage:
        """Channel 3 Failure Status (§7.3: send it, then Close 1000, to end a session with an error)."""
        out = self._status_message(status_failure_json(message, reason, code, details), message)
        assert out is not None
        return out


class K8sClientChannel(_ChannelBase):
    """The client side of one exec/attach connection (the gateway dialing an apiserver).

    Args:
        subprotocol: what the server's 101 selected.
        max_status_bytes: bound on the channel-3 concatenation (1009 beyond it).

    Decoding: channel 1 → :class:`Stdout`, 2 → :class:`Stderr`, 3 →
    :class:`StatusChunk` (also kept for :meth:`exit_code`); an empty message
    (the "ready" signal) and channels the server should not write are ignored
    and counted; a v5 CLOSE signal from the server is validated and ignored.
    A text message from a raw-variant server is an error (1003), as in kubectl.
    """

    __slots__ = ("_status", "_max_status")

    def __init__(self, subprotocol: str, *,
                 max_status_bytes: int = DEFAULT_MAX_STATUS_BYTES) -> None:
        super().__init__(subprotocol)
        self._status = bytearray()
        self._max_status = max_status_bytes

    def __repr__(self) -> str:
        return (f"<K8sClientChannel {self.subprotocol} messages={self._messages}"
                f" status={len(self._status)}B>")

    def statistics(self) -> K8sChannelStatistics:
        return self._stats(0)

    @property
    def status_bytes(self) -> bytes:
        """Everything received on channel 3 so far."""
        return bytes(self._status)

    def receive_message(self, opcode: int, payload: Buffer) -> list[ClientEvent]:
        """Decode one whole server message.

        Raises:
            ProtocolViolation: text message on a raw variant (1003), bad CLOSE
                signal (1002), invalid base64 (1007), status too big (1009).
        """
        self._check_opcode(opcode)
        if opcode == OP_TEXT and not self._base64:
            raise _violation(E_TEXT_FROM_SERVER, CloseCode.UNSUPPORTED_DATA)
        n = len(payload)
        if n == 0:
            self._ignored += 1
            return []
        self._messages += 1
        first = payload[0]
        if self._v5 and first == Channel.CLOSE:
            if n != 2:
                raise _violation(E_CLOSE_LENGTH, CloseCode.PROTOCOL_ERROR)
            if payload[1] > _MAX_CHANNEL:
                raise _violation(E_CLOSE_CHANNEL.format(payload[1]), CloseCode.PROTOCOL_ERROR)
            self._ignored += 1  # kube-apiserver never sends these (§7.4)
            return []
        channel = (first - 0x30) & 0xFF if self._base64 else first
        if channel in (Channel.STDOUT, Channel.STDERR, Channel.ERROR):
            data = self._decode_payload(channel, payload)
            if not data:
                self._ignored += 1  # the empty "ready" message (§11)
                return []
            if channel == Channel.STDOUT:
                return [Stdout(data)]
            if channel == Channel.STDERR:
                return [Stderr(data)]
            if len(self._status) + len(data) > self._max_status:
                raise _violation(E_STATUS_BIG.format(self._max_status),
                                 CloseCode.MESSAGE_TOO_BIG)
            self._status += data
            return [StatusChunk(data)]
        if channel > _MAX_CHANNEL:
            self._unknown += 1
        else:
            self._ignored += 1
        return []

    # -- encoding ---------------------------------------------------------------------------

    def stdin(self, data: Buffer) -> OutMessage:
        """A stdin message (§4.3: ``00`` + bytes).  Keep each ≤ 32 KiB (§11)."""
        return self._encode(Channel.STDIN, data)

    def resize(self, cols: int, rows: int) -> OutMessage:
        """A resize message with kubectl's exact bytes: ``04{"Width":W,"Height":H}\\n`` (§4.3).

        Raises:
            ValueError: a size outside 1..65535 (uint16, and zero is dropped by servers).
        """
        for name, value in (("cols", cols), ("rows", rows)):
            if not _is_int(value) or not 1 <= value <= 0xFFFF:
                raise ValueError(f"{name}={value!r} outside 1..65535")
        body = b'{"Width":%d,"Height":%d}\n' % (cols, rows)
        return self._encode(Channel.RESIZE, body)

    def close_stdin(self) -> OutMessage:
        """The v5 CLOSE signal for stdin, ``FF 00`` (§4.7, §11).

        Raises:
            LocalProtocolError: the subprotocol is not v5; v4 and older have no
                stdin EOF (closing the WebSocket would lose the exit status, §7.2).
        """
        if not self._v5:
            raise LocalProtocolError(f"{self.subprotocol} has no stdin close signal")
        return bytes((Channel.CLOSE,)), b"\x00"

    def exit_code(self) -> int:
        """The exit code once the connection has ended (channel 3 is complete).

        v4/v5: :func:`exit_code_from_status`.  v1 variants: no channel-3 text
        means success (0); any text is the error (client-go's ``errorDecoderV1``).

        Raises:
            K8sStatusError: the command failed without an exit code.
            ProtocolViolation: the status is malformed (see exit_code_from_status).
        """
        if self._json_status:
            return exit_code_from_status(self._status)
        if not self._status:
            return 0
        text = bytes(self._status).decode("utf-8", "replace")
        raise K8sStatusError(f"error executing remote command: {text}")


__all__ = [
    "BASE64_CHANNEL", "CHANNEL", "SUBPROTOCOLS", "V4_BASE64_CHANNEL", "V4_CHANNEL", "V5_CHANNEL",
    "Channel", "K8sChannelStatistics", "K8sClientChannel", "K8sServerChannel", "K8sStatusError",
    "OutMessage", "exit_code_from_status", "exit_message", "negotiate", "status_exit_code_json",
    "status_failure_json", "status_internal_error_json", "status_json", "status_success_json",
    "CAUSE_EXIT_CODE", "REASON_NON_ZERO_EXIT", "DEFAULT_MAX_RESIZE_BYTES",
    "DEFAULT_MAX_STATUS_BYTES",
]

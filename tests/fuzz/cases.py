"""Seeded generators of hostile input for the gateway's three input surfaces.

Everything here is a pure function of a ``random.Random``: the same seed
gives the same bytes, so a failing case can be reproduced from the seed and
the case number the harness prints.  No coverage guidance: the generators
start from *valid* input (so the parsers get deep) and then break it in the
ways parsers get wrong -- lengths, encodings, limits, order, splits.

* HTTP: request heads and bodies from templates for every route (health,
  REST, static files, kubectl's reads, WebSocket upgrades), mutated at the
  header, line and byte level.
* WebSocket frames: messages framed with random fragmentation, interleaved
  pings and pongs, close frames with any code, and corrupted headers
  (reserved bits, unknown opcodes, missing masks, non-minimal or huge
  lengths), written in random splits.
* podterm.v1 and channel.k8s.io messages: every message type with valid and
  invalid layouts, and control JSON mutated from the valid messages
  (wrong types, huge numbers, deep nesting, invalid UTF-8, sizes around the
  16 KiB limit).
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from urllib.parse import quote

from podterm.protocol.frame import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT
from podterm.protocol.mask import mask

__all__ = ["Target", "WsCase", "frames", "http_request", "k8s_case", "mutate", "podterm_case"]


@dataclass(frozen=True, slots=True)
class Target:
    """What the generators may name: the gateway, a credential, a session."""

    port: int
    token: str
    session_id: str


@dataclass(frozen=True, slots=True)
class WsCase:
    """Bytes to write after a WebSocket upgrade, and what they contain.

    Attributes:
        wire: the bytes, exactly as they go on the wire.
        chunks: where to split them into separate writes.
        close_code: the code of a well-formed CLOSE frame in ``wire`` (the
            gateway may echo it), or None.
        corrupt: whether the frame layer was deliberately broken.
    """

    wire: bytes
    chunks: tuple[int, ...]
    close_code: int | None
    corrupt: bool


# ------------------------------------------------------------------ bytes


def _blob(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


_INTERESTING = [b"\x00", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b" ", b":", b",", b";", b"%",
                b"%00", b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\t",
                b"\\", b'"', b"{", b"}", b"[", b"]", b"0", b"-1", b"18446744073709551616",
                b"9" * 40, b"1e999", b"NaN", b"null"]


def mutate(rng: random.Random, data: bytes, ops: int | None = None) -> bytes:
    """``data`` with a few byte-level edits: flips, inserts, deletes, repeats, cuts."""
    buf = bytearray(data)
    for _ in range(ops if ops is not None else rng.randint(1, 4)):
        where = rng.randint(0, len(buf)) if buf else 0
        op = rng.randrange(7)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert something parsers trip on
            buf[where:where] = rng.choice(_INTERESTING)
        elif op == 2 and buf:  # delete a range
            buf[where:where + rng.randint(1, 16)] = b""
        elif op == 3 and buf:  # repeat a range
            piece = buf[where:where + rng.randint(1, 64)]
            buf[where:where] = piece * rng.randint(1, 8)
        elif op == 4 and buf:  # cut the tail
            del buf[rng.randint(0, len(buf)):]
        elif op == 5:  # random bytes
            buf[where:where] = _blob(rng, rng.randint(1, 32))
        else:  # replace a byte
            if buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def splits(rng: random.Random, length: int) -> tuple[int, ...]:
    """Split points for writing ``length`` bytes: whole, a byte at a time, or random."""
    if length <= 1:
        return ()
    mode = rng.randrange(4)
    if mode == 0:
        return ()
    if mode == 1 and length <= 64:
        return tuple(range(1, length))
    count = min(length - 1, rng.randint(1, 8))
    return tuple(sorted(rng.sample(range(1, length), count)))


# ------------------------------------------------------------------- HTTP

_METHODS = ["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
            "get", "G\x00T", "GETT", ""]


def _json_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 6 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 65535, 65536, 10001, 2**63, 2**64, -(2**63), 10**30])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 3.14])
    if kind == 4:
        return rng.choice(["", "x", "a" * rng.randint(1, 300), "\u0000", "\ud7ff", "../..",
                           "s-000000000000", "default", "local", "podterm.v1", "€" * 10])
    if kind == 5:
        return "".join(rng.choice("abc-_./ \u00e9") for _ in range(rng.randint(0, 20)))
    if kind == 6:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == 7:
        return {rng.choice(["type", "code", "offset", "message", "a", ""]):
                _json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [[[[[[[[]]]]]]]] if rng.random() < 0.5 else {"a": {"b": {"c": {"d": {}}}}}


def _create_body(rng: random.Random) -> bytes:
    body: dict[str, object] = {"command": rng.choice([["true"], ["cat"], ["sh", "-c", "exit 3"],
                                                      [], ["/nonexistent"], None, "true",
                                                      ["true"] * 300])}
    for key in rng.sample(["tty", "cols", "rows", "namespace", "pod", "container", "env",
                           "upstream", "stdin", "term", "cwd", "junk"], rng.randint(0, 5)):
        body[key] = _json_value(rng)
    text = json.dumps(body).encode()
    return mutate(rng, text) if rng.random() < 0.4 else text


def http_request(rng: random.Random, target: Target) -> bytes:
    """One (usually) HTTP/1.1 request for a random route, often broken."""
    sid = target.session_id
    routes = [
        ("GET", "/healthz", False), ("GET", "/readyz", False), ("GET", "/metrics", False),
        ("GET", "/", False), ("GET", "/app.js", False), ("GET", "/version", False),
        ("GET", "/api", True), ("GET", "/apis", True), ("GET", "/api/v1", True),
        ("GET", "/api/v1/namespaces/default/pods/local", True),
        ("GET", "/api/v1/sessions", True), ("GET", f"/api/v1/sessions/{sid}", True),
        ("POST", "/api/v1/sessions", True), ("DELETE", "/api/v1/sessions/s-000000000000", True),
        ("GET", f"/api/v1/sessions/{sid}/attach?mode=ro&offset=0", True),
        ("GET", "/api/v1/namespaces/default/pods/local/exec?command=true&stdout=true", True),
        ("GET", "/api/v1/agents/connect", True),
        ("GET", "/" + quote(_blob(rng, 8).decode("latin-1"), safe="/%"), False),
    ]
    method, path, authed = rng.choice(routes)
    headers: list[tuple[str, str]] = [("Host", f"127.0.0.1:{target.port}")]
    if authed and rng.random() < 0.85:
        headers.append(("Authorization", "Bearer " + (
            target.token if rng.random() < 0.8 else rng.choice(["", "x", "a" * 9000, "\x00"]))))
    upgrade = "attach" in path or "exec" in path or "agents" in path
    if upgrade and rng.random() < 0.8:
        headers += [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                    ("Sec-WebSocket-Version", rng.choice(["13", "13", "8", "13, 8", ""])),
                    ("Sec-WebSocket-Key", rng.choice(["dGhlIHNhbXBsZSBub25jZQ==", "short",
                                                      "", "dGhlIHNhbXBsZSBub25jZQ"])),
                    ("Sec-WebSocket-Protocol", rng.choice([
                        "podterm.v1", "v5.channel.k8s.io", "v4.channel.k8s.io",
                        "podterm.v1, bearer.podterm.!!!", "bearer.podterm.", "x, y, z",
                        "podterm.tunnel.v1"]))]
        if rng.random() < 0.3:
            headers.append(("Origin", rng.choice(["https://evil.example", "null",
                                                  f"http://127.0.0.1:{target.port}",
                                                  "http://" + "a" * 600])))
        if rng.random() < 0.2:
            headers.append(("Sec-WebSocket-Extensions", "permessage-deflate; client_max"))
    body = b""
    if method == "POST":
        body = _create_body(rng)
    # Header-level mutations.
    for _ in range(rng.randint(0, 3)):
        op = rng.randrange(8)
        if op == 0 and headers:
            headers.append(rng.choice(headers))  # duplicate
        elif op == 1 and headers:
            headers.pop(rng.randrange(len(headers)))
        elif op == 2:
            headers.append(("X-" + "a" * rng.randint(1, 40), "v" * rng.choice([1, 100, 20000])))
        elif op == 3:
            headers.append(("Transfer-Encoding", rng.choice(["chunked", "gzip", "chunked, gzip",
                                                             "identity"])))
        elif op == 4:
            headers.append(("Content-Length", rng.choice(["0", "-1", "5", "99999999999", "abc",
                                                          "10, 11", " 3"])))
        elif op == 5:
            headers.append(("Expect", "100-continue"))
        elif op == 6:
            headers.append(("X-Forwarded-For", rng.choice(["1.2.3.4", "::1", "garbage", ""])))
        else:
            headers.append(("Content-Type", rng.choice(["text/plain", "application/json",
                                                        "multipart/form-data; boundary=x"])))
    if body and not any(name.lower() in ("content-length", "transfer-encoding")
                        for name, _ in headers):
        headers.append(("Content-Length", str(len(body))))
    if rng.random() < 0.1:
        method = rng.choice(_METHODS)
    version = rng.choice(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 extra", ""])
    if any(n == "Transfer-Encoding" and v == "chunked" for n, v in headers):
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if rng.random() < 0.7 \
            else mutate(rng, b"5\r\nhello\r\n0\r\n\r\n")
    head = f"{method} {path} {version}\r\n".encode("latin-1", "replace") + b"".join(
        f"{n}: {v}\r\n".encode("latin-1", "replace") for n, v in headers) + b"\r\n"
    data = head + body
    roll = rng.random()
    if roll < 0.35:
        data = mutate(rng, data)
    elif roll < 0.40:
        data = _blob(rng, rng.randint(0, 512))  # not HTTP at all (TLS, SSH, noise)
    elif roll < 0.45:
        data = data + data  # pipelined
    return data


# ------------------------------------------------------------ WebSocket frames

_KEY = b"\x37\xfa\x21\x3d"


def _frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
           length: int | None = None, long_form: int = 0) -> bytes:
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if masked else 0
    if long_form == 2 or n >= 0x10000:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    elif long_form == 1 or n >= 126:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = bytes((b0, mbit | n))
    return head + (_KEY + mask(payload, _KEY) if masked else payload)


def frames(rng: random.Random, messages: list[tuple[int, bytes]]) -> WsCase:
    """Frame ``messages`` (opcode, payload) with random fragmentation, control frames
    and, sometimes, a deliberately broken frame layer."""
    out = bytearray()
    close_code: int | None = None
    corrupt = False
    for opcode, payload in messages:
        if rng.random() < 0.15:  # a control frame between messages
            kind = rng.randrange(3)
            if kind == 0:
                out += _frame(OP_PING, _blob(rng, rng.randint(0, 125)))
            elif kind == 1:
                out += _frame(OP_PONG, _blob(rng, rng.randint(0, 20)))
        if len(payload) > 1 and rng.random() < 0.3:  # fragmented
            cuts = sorted(rng.sample(range(1, len(payload)), min(len(payload) - 1,
                                                                 rng.randint(1, 4))))
            parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)],
                                                   strict=True)]
            for i, part in enumerate(parts):
                out += _frame(opcode if i == 0 else OP_CONT, part, fin=i == len(parts) - 1)
                if rng.random() < 0.2:
                    out += _frame(OP_PING, b"mid")  # allowed between fragments
        else:
            out += _frame(opcode, payload, long_form=rng.choice([0, 0, 0, 0, 1, 2]))
    roll = rng.random()
    if roll < 0.25:
        corrupt = True
        breakage = rng.randrange(9)
        if breakage == 0:
            out += _frame(OP_BINARY, b"\x00x", rsv=rng.randint(1, 7))
        elif breakage == 1:
            out += _frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), b"")
        elif breakage == 2:
            out += _frame(OP_BINARY, b"\x00x", masked=False)
        elif breakage == 3:
            out += _frame(OP_BINARY, b"", length=rng.choice([(1 << 20) + 1, 1 << 40, (1 << 63) - 1,
                                                             1 << 63]))
        elif breakage == 4:
            out += _frame(OP_PING, _blob(rng, 126))  # control frame too long
        elif breakage == 5:
            out += _frame(OP_PING, b"x", fin=False)  # fragmented control frame
        elif breakage == 6:
            out += _frame(OP_CONT, b"orphan")
        elif breakage == 7:
            out += _frame(OP_TEXT, rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xf8"]))
        else:
            out = bytearray(mutate(rng, bytes(out)))
    elif roll < 0.40:
        # A CLOSE from the client: valid, reserved, out of range, or malformed.
        code = rng.choice([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 3000, 4000, 4999,
                           999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
        reason = rng.choice([b"", b"bye", b"\xff\xfe", b"x" * 123])
        payload = struct.pack("!H", code) + reason
        if rng.random() < 0.1:
            payload = b"\x03"  # a 1-byte close payload
        out += _frame(OP_CLOSE, payload[:125])
        # What the gateway may echo; whether it is a valid code is its call
        # (an invalid one must be answered 1002, which is allowed anyway).
        close_code = code if len(payload) >= 2 else None
    data = bytes(out)
    return WsCase(data, splits(rng, len(data)), close_code, corrupt)


# ------------------------------------------------------------- podterm.v1


def control_json(rng: random.Random) -> bytes:
    """A CONTROL body: valid, schema-broken, not JSON, or oversized."""
    base = rng.choice([{"type": "detach"}, {"type": "stdin_eof", "offset": 0},
                       {"type": "error", "code": "x", "message": "m"}, {"type": "future-thing"},
                       {"type": "hello"}, {"type": "gap"}, {"type": "drain"}, {}])
    obj: object = dict(base)
    roll = rng.random()
    if roll < 0.4 and isinstance(obj, dict):
        for _ in range(rng.randint(1, 3)):
            obj[rng.choice(["type", "offset", "code", "message", "extra"])] = _json_value(rng)
    elif roll < 0.5:
        obj = _json_value(rng)
    text = json.dumps(obj).encode()
    roll = rng.random()
    if roll < 0.2:
        return mutate(rng, text)
    if roll < 0.25:
        return text[:-1] + b' ,"pad":"' + b"p" * rng.choice([16000, 16400, 70000]) + b'"}'
    if roll < 0.3:
        return rng.choice([b"[" * 5000 + b"]" * 5000, b"NaN", b'{"type":"detach","type":1}',
                           b'{"type":"\xff"}', b"\xef\xbb\xbf{}", b'{"offset":1e400}'])
    return text


def podterm_case(rng: random.Random, *, writer: bool) -> WsCase:
    """Messages for a podterm.v1 attachment (a writer's or a viewer's)."""
    messages: list[tuple[int, bytes]] = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(10)
        if kind == 0:
            messages.append((OP_BINARY, b"\x00" + _blob(rng, rng.choice([0, 1, 5, 100, 65536,
                                                                        65537]))))
        elif kind == 1:
            messages.append((OP_BINARY, b"\x04" + rng.choice([
                struct.pack("!HH", rng.randint(0, 12000), rng.randint(0, 12000)),
                b"\x00\x50", b"\x00\x50\x00\x18\x00"])))
        elif kind == 2:
            messages.append((OP_BINARY, b"\x05" + rng.choice([
                struct.pack("!Q", rng.choice([0, 1, 2**63, 2**64 - 1])), b"\x00" * 7])))
        elif kind in (3, 4, 5):
            messages.append((OP_BINARY, b"\x06" + control_json(rng)))
        elif kind == 6:
            messages.append((OP_BINARY, bytes((rng.choice([1, 2, 3, 7, 8, 255]),))
                             + _blob(rng, rng.randint(0, 30))))
        elif kind == 7:
            messages.append((OP_BINARY, b""))
        elif kind == 8:
            messages.append((OP_TEXT, rng.choice([b"hello", b"", "\u00e9".encode()])))
        else:
            messages.append((OP_BINARY, b"\x00" + b"echo fuzz\n"))
    if not writer and rng.random() < 0.7:
        messages = [m for m in messages if not m[1].startswith(b"\x00")]
        messages.append((OP_BINARY, b"\x05" + struct.pack("!Q", 0)))
    return frames(rng, messages)


# ---------------------------------------------------------- channel.k8s.io


def _resize_json(rng: random.Random) -> bytes:
    obj: object = {"Width": rng.choice([80, 0, -1, 65536, 2**40, "80", None]),
                   "Height": rng.choice([24, 0, 65535, 1.5, [], {}])}
    if rng.random() < 0.3:
        obj = _json_value(rng)
    text = json.dumps(obj).encode()
    return mutate(rng, text) if rng.random() < 0.3 else text


def k8s_case(rng: random.Random) -> WsCase:
    """Messages for a kubectl exec link (v4/v5 channel.k8s.io)."""
    messages: list[tuple[int, bytes]] = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.randrange(7)
        if kind == 0:
            messages.append((OP_BINARY, b"\x00" + _blob(rng, rng.randint(0, 200))))
        elif kind == 1:
            messages.append((OP_BINARY, b"\x04" + _resize_json(rng)))
        elif kind == 2:
            messages.append((OP_BINARY, b"\xff" + bytes((rng.choice([0, 1, 2, 3, 4, 5, 255]),))
                             + rng.choice([b"", b"\x00"])))
        elif kind == 3:
            messages.append((OP_BINARY, bytes((rng.choice([1, 2, 3, 5, 6, 100]),)) + b"x"))
        elif kind == 4:
            messages.append((OP_BINARY, b""))
        elif kind == 5:
            messages.append((OP_TEXT, rng.choice([b"0aGVsbG8=", b"4" + _resize_json(rng),
                                                  b"\x00plain"])))
        else:
            messages.append((OP_BINARY, b"\x00hello\n"))
    return frames(rng, messages)

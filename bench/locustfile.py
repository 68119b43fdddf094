"""A locust user that holds one podterm.v1 session and types into it.

For people who capacity-test their own podterm deployment with locust
(``pip install 'podterm[bench]'`` or ``pip install locust``)::

    PODTERM_TOKEN=... locust -f bench/locustfile.py --host http://127.0.0.1:7780
    PODTERM_TOKEN=... locust -f bench/locustfile.py --host http://127.0.0.1:7780 \\
        --headless -u 200 -r 20 -t 1m

Each simulated user

1. creates a session over REST (``POST /api/v1/sessions``, bearer token);
2. attaches to it over WebSocket (``/api/v1/sessions/{id}/attach``,
   subprotocol ``podterm.v1``) and waits for ``hello`` and, for the login
   shell, its first output (the prompt);
3. types one keystroke per ``PODTERM_LOCUST_KEY_INTERVAL`` seconds (default
   0.1: 10 keys/s), alternating ``a`` and DEL so the shell's line never
   grows, and reads until the echo arrives: locust reports it as request type
   ``WS``, name ``keystroke echo``, with the round trip as its response time;
4. ACKs the output it received (docs/protocol.md §6: at least every 100 ms
   while data flows) in the same write as the next keystroke;
5. on stop, detaches (CONTROL ``detach``) and deletes its session.

Settings (environment):

``PODTERM_TOKEN``
    the bearer token (required).
``PODTERM_LOCUST_COMMAND``
    JSON command for the session, e.g. ``["sh", "-c", "stty raw -echo; exec cat"]``;
    default ``null``: the gateway's login shell.
``PODTERM_LOCUST_UPSTREAM``
    the session's upstream (``local``, ``kube``, ``agent``); default: the gateway's.
``PODTERM_LOCUST_KEY_INTERVAL``
    seconds between keystrokes (0.1).

The WebSocket side uses ``websocket-client`` (a dependency of the
``kubernetes`` package podterm already needs); under locust's gevent it is
cooperative.  Server PINGs are answered by ``websocket-client`` while reading.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlencode

import websocket  # websocket-client
from locust import HttpUser, constant_pacing, events, task

SUBPROTOCOL = "podterm.v1"
T_STDIN, T_STDOUT, T_STDERR, T_EXIT, T_RESIZE, T_ACK, T_CONTROL = range(7)
KEYS = (b"a", b"\x7f")
ACK_EVERY_S = 0.1  # docs/protocol.md §6
ACK_EVERY_BYTES = 128 * 1024  # half the default window

TOKEN = os.environ.get("PODTERM_TOKEN", "")
COMMAND = json.loads(os.environ.get("PODTERM_LOCUST_COMMAND", "null"))
UPSTREAM = os.environ.get("PODTERM_LOCUST_UPSTREAM") or None
KEY_INTERVAL = float(os.environ.get("PODTERM_LOCUST_KEY_INTERVAL", "0.1"))


@events.init.add_listener
def _check_token(environment: Any, **_kwargs: Any) -> None:
    if not TOKEN:
        raise SystemExit("locustfile: set PODTERM_TOKEN to the gateway's bearer token")


class PodtermSessionUser(HttpUser):
    """One interactive session per user; every task is one keystroke round trip."""

    wait_time = constant_pacing(KEY_INTERVAL)

    session_id: str | None = None
    ws: websocket.WebSocket | None = None

    def on_start(self) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        body: dict[str, Any] = {"command": COMMAND, "tty": True}
        if UPSTREAM:
            body["upstream"] = UPSTREAM
        with self.client.post("/api/v1/sessions", json=body, headers=headers,
                              name="POST /api/v1/sessions", catch_response=True) as resp:
            if resp.status_code != 201:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                self.stop()
                return
            info = resp.json()
        self.session_id = info["id"]
        query = urlencode({"offset": 0, "mode": "rw", "resume_token": info["resume_token"]})
        base = self.host.rstrip("/")
        url = "ws" + base[len("http"):] + f"{info['attach_url']}?{query}"
        self.out = 0
        self.acked = 0
        self.last_ack = time.monotonic()
        self.key_index = 0
        t0 = time.perf_counter()
        exc: Exception | None = None
        try:
            self.ws = websocket.create_connection(
                url, subprotocols=[SUBPROTOCOL], header=[f"Authorization: Bearer {TOKEN}"],
                timeout=30)
            self._read_until(lambda kind, doc: kind == T_CONTROL and doc.get("type") == "hello")
            if COMMAND is None:
                self._read_until(lambda kind, doc: kind == T_STDOUT)  # the shell's prompt
        except Exception as e:  # reported to locust, then this user stops
            exc = e
        self._fire("WS", "attach", t0, exc)
        if exc is not None:
            self.stop()

    def on_stop(self) -> None:
        if self.ws is not None:
            try:
                self.ws.send_binary(bytes([T_CONTROL]) + b'{"type":"detach"}')
                self.ws.close()
            except Exception:
                pass
            self.ws = None
        if self.session_id:
            self.client.delete(f"/api/v1/sessions/{self.session_id}",
                               headers={"Authorization": f"Bearer {TOKEN}"},
                               name="DELETE /api/v1/sessions/{id}")
            self.session_id = None

    @task
    def keystroke(self) -> None:
        if self.ws is None:
            return
        key = KEYS[self.key_index & 1]
        self.key_index += 1
        t0 = time.perf_counter()
        exc: Exception | None = None
        try:
            self._send_ack_if_due()
            self.ws.send_binary(bytes([T_STDIN]) + key)
            self._read_until(lambda kind, doc: kind == T_STDOUT)
        except Exception as e:
            exc = e
        self._fire("WS", "keystroke echo", t0, exc, len(key))

    # ---------------------------------------------------------------- helpers

    def _read_until(self, done: Any) -> None:
        """Read podterm.v1 messages until ``done(kind, control_doc)`` is true."""
        assert self.ws is not None
        while True:
            opcode, data = self.ws.recv_data()
            if opcode != websocket.ABNF.OPCODE_BINARY or not data:
                continue
            kind = data[0]
            doc: dict[str, Any] = {}
            if kind in (T_STDOUT, T_STDERR):
                self.out += len(data) - 1
            elif kind == T_CONTROL:
                doc = json.loads(data[1:])
                if doc.get("type") == "error":
                    raise RuntimeError(f"gateway error: {doc}")
            elif kind == T_EXIT:
                raise RuntimeError(f"session exited: {data[1:]!r}")
            if done(kind, doc):
                return

    def _send_ack_if_due(self) -> None:
        assert self.ws is not None
        now = time.monotonic()
        unacked = self.out - self.acked
        if unacked and (unacked >= ACK_EVERY_BYTES or now - self.last_ack >= ACK_EVERY_S):
            self.ws.send_binary(bytes([T_ACK]) + self.out.to_bytes(8, "big"))
            self.acked = self.out
            self.last_ack = now

    def _fire(self, kind: str, name: str, t0: float, exc: Exception | None,
              length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=(time.perf_counter() - t0) * 1000,
            response_length=length, exception=exc, context={})

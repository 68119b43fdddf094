"""A real ``redis-server`` for tests: 127.0.0.1, a free port, a temporary directory.

``RedisServer(directory)`` starts nothing until :meth:`RedisServer.start`.
Readiness is a ``PING`` answered with ``PONG`` (not ``LOADING``), polled until
a deadline: no fixed sleeps.  :meth:`RedisServer.stop` ends it (SIGTERM, or
SIGKILL to simulate a crash) and :meth:`RedisServer.start` brings it back on
the *same* port, which is what a restart test needs.

Persistence (``persistence=``):

- ``"aof"``: append-only file with ``appendfsync always`` in the directory: every
  acknowledged write survives even SIGKILL, so a restart keeps the data.
- ``"none"``: no RDB, no AOF: a restart comes back empty (what the gateway must
  survive by re-putting its sessions).

Blocking calls (subprocess, sockets): from trio tests, call the ``a*`` twins,
which run them in a worker thread so the store under test keeps running.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from podterm.store._resp import NEED_DATA, Reply, RespParser, encode_command

__all__ = ["RedisServer", "RedisTLS", "redis_server_available", "running_redis"]

HOST = "127.0.0.1"
#: Bound on start-up (process start + AOF load) and on stop.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
#: Readiness is polled at this interval (a condition with a deadline, not a sleep-to-fix).
_POLL_S = 0.01


def redis_server_available() -> bool:
    """Whether ``redis-server`` is on PATH (scripts/setup.sh --test installs it)."""
    return shutil.which("redis-server") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class RedisTLS:
    """TLS files for ``--tls-port`` (PEM paths) and the context a client should trust."""

    cert_file: str
    key_file: str
    ca_file: str
    client_context: ssl.SSLContext


class RedisServer:
    """One ``redis-server`` process under test control.

    Args:
        directory: its working directory (AOF/RDB and the log go here).
        persistence: ``"aof"`` or ``"none"`` (see the module docstring).
        password: ``requirepass`` if set.
        tls: serve TLS only (``--port 0 --tls-port PORT``).
    """

    def __init__(self, directory: Path, *, persistence: str = "aof", password: str | None = None,
                 tls: RedisTLS | None = None) -> None:
        if persistence not in ("aof", "none"):
            raise ValueError(f"persistence must be 'aof' or 'none', got {persistence!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        self.password = password
        self.tls = tls
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<RedisServer {HOST}:{self.port} {self.persistence} {state}>"

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        """``redis://`` (or ``rediss://``) URL of database 0, with the password if any."""
        assert self.port is not None, "start() first"
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{HOST}:{self.port}/0"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _argv(self, port: int) -> list[str]:
        argv = ["redis-server", "--bind", HOST, "--dir", str(self.directory),
                "--logfile", str(self.log_path), "--daemonize", "no", "--save", "",
                "--appendfilename", "appendonly.aof", "--dbfilename", "dump.rdb"]
        if self.persistence == "aof":
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls:
            argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", self.tls.cert_file,
                     "--tls-key-file", self.tls.key_file, "--tls-ca-cert-file", self.tls.ca_file,
                     "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(port)]
        return argv

    def start(self) -> None:
        """Start (again, on the same port after a stop) and wait until it answers PING.

        Raises:
            RuntimeError: it exited or did not become ready within START_TIMEOUT_S
                (the message carries the end of its log).
        """
        if self.is_running:
            raise RuntimeError(f"{self!r} is already running")
        fresh = self.port is None
        for _attempt in range(5 if fresh else 1):
            port = _free_port() if fresh else self.port
            assert port is not None
            self._proc = subprocess.Popen(self._argv(port), stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.port = port
            if self._wait_ready(time.monotonic() + START_TIMEOUT_S):
                return
            # It exited: most likely someone took the port between probe and bind.
            if fresh:
                self.port = None
        raise RuntimeError(f"redis-server did not start on {HOST}:{port}:\n{self.log_tail()}")

    def _wait_ready(self, deadline: float) -> bool:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc.wait()
                if self._proc.stderr:
                    self._proc.stderr.close()
                return False
            with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
                if self.command("PING", timeout_s=1.0) == "PONG":
                    return True
            time.sleep(_POLL_S)  # polling a condition, bounded by the deadline
        self.stop(kill=True)
        raise RuntimeError(f"redis-server on {HOST}:{self.port} not ready within "
                           f"{START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self, *, kill: bool = False) -> None:
        """End the process: SIGTERM (clean shutdown) or SIGKILL (a crash).  Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)  # a paused server must run to see SIGTERM
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
        if proc.stderr:
            proc.stderr.close()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a hung server)."""
        assert self._proc is not None and self.is_running
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    # trio-friendly twins (the store under test keeps running meanwhile)
    async def astart(self) -> None:
        await trio.to_thread.run_sync(self.start)

    async def astop(self, *, kill: bool = False) -> None:
        await trio.to_thread.run_sync(lambda: self.stop(kill=kill))

    async def acommand(self, *args: str | bytes | int) -> Reply:
        return await trio.to_thread.run_sync(lambda: self.command(*args))

    def _connect(self, timeout_s: float) -> socket.socket:
        assert self.port is not None
        sock = socket.create_connection((HOST, self.port), timeout=timeout_s)
        if self.tls:
            return self.tls.client_context.wrap_socket(sock, server_hostname=HOST)
        return sock

    def command(self, *args: str | bytes | int, timeout_s: float = 5.0) -> Reply:
        """Run one command on a fresh connection (blocking) and return its reply.

        Error replies come back as :class:`~podterm.store._resp.RespError` values
        (e.g. ``LOADING`` while the AOF is read), not raised.
        """
        with self._connect(timeout_s) as sock:
            sock.settimeout(timeout_s)
            commands: list[tuple[str | bytes | int, ...]] = []
            if self.password:
                commands.append(("AUTH", self.password))
            commands.append(args)
            sock.sendall(b"".join(encode_command(c) for c in commands))
            parser = RespParser()
            replies: list[Reply] = []
            while len(replies) < len(commands):
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("redis closed the connection")
                parser.feed(data)
                while (reply := parser.next_reply()) is not NEED_DATA:
                    replies.append(reply)  # type: ignore[arg-type]
            return replies[-1]

    def keys(self, pattern: str) -> list[bytes]:
        """Every key matching ``pattern`` (SCAN, so it never blocks a big server)."""
        found: list[bytes] = []
        cursor: bytes | str = "0"
        while True:
            reply = self.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            assert isinstance(reply, list) and isinstance(reply[1], list), reply
            cursor = reply[0]  # type: ignore[assignment]
            found += [k for k in reply[1] if isinstance(k, bytes)]
            if cursor == b"0":
                return found

    def dump_values(self, pattern: str) -> bytes:
        """Every value under ``pattern`` by type, plus the AOF if any: what Redis holds on disk
        and in memory, for "was a plaintext token ever sent?" checks."""
        out = bytearray()
        for key in self.keys(pattern):
            kind = self.command("TYPE", key)
            command = {"hash": "HGETALL", "set": "SMEMBERS", "string": "GET",
                       "zset": "ZRANGE"}.get(str(kind))
            if command is None:
                continue
            reply = self.command(command, key, *((0, -1) if command == "ZRANGE" else ()))
            out += key + b"=" + repr(reply).encode() + b"\n"
        for path in sorted(self.directory.rglob("*.aof")):
            out += path.read_bytes()
        return bytes(out)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_redis(directory: Path, **kwargs: object) -> Iterator[RedisServer]:
    """``with running_redis(tmp_path) as server:`` — started, stopped at the end."""
    server = RedisServer(directory, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()

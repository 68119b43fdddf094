"""``podterm serve --workers N``: a supervisor and N gateway processes on one port.

One Python process is one core and one event loop (ARCHITECTURE.md, "Scale
past one machine"), so a machine runs several **workers**.  The process that
``podterm serve --workers N`` starts is their **supervisor**; it serves no
request itself::

    supervisor (this module's main)          holds the port (bound, not listening)
    ├── worker 0: python -m podterm.gateway.workers   a whole gateway (server.serve)
    ├── worker 1: ...                                  public listener: SO_REUSEPORT
    └── worker N-1                                     peer listener: 127.0.0.1:0

* **Port.**  The supervisor binds the public address with ``SO_REUSEPORT``
  first (port 0 becomes a real port there) and keeps that socket, never
  listening on it; each worker binds the same address with ``SO_REUSEPORT``
  and listens, and the kernel spreads new connections over the listening
  workers.  A restarted worker rebinds while the others keep serving.
* **Peers.**  Each worker also listens on its own peer address (``127.0.0.1``,
  or the ``--advertise`` host, port 0): the holder recorded in the store for
  its sessions.  A client whose session lives in another worker is served
  through it (:mod:`podterm.gateway.peers`).  The supervisor keeps a private
  directory (``0700``) with ``peers.json``: every worker's peer address, for
  ``/metrics`` (any worker shows all workers' series).
* **Secrets.**  The peer secret (``--peer-secret-file``, else 32 random bytes)
  and the admin token (configured, else generated once here, so every worker
  accepts the same one) go to each worker inside its spec, written to a pipe
  the worker inherits: never argv, never the environment.  That pipe stays
  open as the worker's lifeline: when the supervisor dies, the worker drains.
* **Store.**  Workers share the configured store.  ``memory://`` lives in one
  process, so the supervisor gives its workers a private SQLite file instead
  (in the private directory, removed at exit) and says so in the log.
* **Signals.**  SIGTERM and SIGINT are passed to every worker; each drains
  (``/readyz`` 503, ``drain`` to its clients, bounded by ``--drain-timeout``)
  and exits; the supervisor exits 0 once all have exited 0 (a worker still
  running ``drain_timeout + 15 s`` later is killed).
* **Restarts.**  A worker that exits while no shutdown was asked for is
  restarted after a backoff (full jitter, 0.5 s growing to 10 s); its
  replacement marks the sessions of the dead one closed in the store (their
  shells died with it; agent sessions are left for adoption), as the
  supervisor does at start for workers of an earlier run.  More than
  :data:`MAX_RESTARTS` restarts of one worker within
  :data:`RESTART_WINDOW_S` is a crash loop: the supervisor stops everything
  and exits 1.  A worker that fails before all have started ends the start
  (its exit status: 2 for a configuration error).
* **Ready.**  Once every worker listens, the supervisor writes
  ``--ready-file`` (``{"url", "pid", "workers", "token"?}``, the supervisor's
  pid) and prints the banner once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from podterm.config import ServeConfig, StoreConfig
from podterm.errors import ConfigError
from podterm.gateway.peers import WorkerRole, load_peer_secret, parse_peer_address
from podterm.resilience.backoff import Backoff

__all__ = ["MAX_RESTARTS", "RESTART_WINDOW_S", "WorkerSpec", "main", "open_listeners"]

log = logging.getLogger(__name__)

#: Restarts of one worker within :data:`RESTART_WINDOW_S` that make a crash loop.
MAX_RESTARTS: Final = 5
RESTART_WINDOW_S: Final = 60.0
#: A worker must listen within this long of being started (imports, store, bind).
START_TIMEOUT_S: Final = 60.0
#: After the drain timeout, how long a worker may take to exit before it is killed.
EXIT_GRACE_S: Final = 15.0
#: The length prefix of the spec on a worker's pipe.
_LENGTH = struct.Struct(">I")


# ----------------------------------------------------------------- listeners


async def open_listeners(host: str, port: int, *,
                         reuse_port: bool = False) -> list[trio.SocketListener]:
    """TCP listeners on every address of ``host``; with ``SO_REUSEPORT`` when asked.

    Without ``reuse_port`` this is :func:`trio.open_tcp_listeners`.  With it,
    each socket sets ``SO_REUSEADDR`` and ``SO_REUSEPORT`` before binding, so
    several worker processes can listen on the same port and the kernel
    spreads connections over them.

    Raises:
        OSError: an address cannot be bound (the listeners opened so far are closed).
    """
    if not reuse_port:
        return list(await trio.open_tcp_listeners(port, host=host))
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                          flags=socket.AI_PASSIVE)
    listeners: list[trio.SocketListener] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, type_, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(socket.SOMAXCONN)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    return listeners


def _host_of(address: str) -> str | None:
    try:
        return parse_peer_address(address)[0]
    except ValueError:
        return None


async def _answers(address: str, timeout_s: float = 1.0) -> bool:
    """Whether anything accepts a connection at the peer address (unsure counts as yes)."""
    host, port = parse_peer_address(address)
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        await trio.aclose_forcefully(stream)
    return True


def _bind(family: int, address: Any, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _pin_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with SO_REUSEPORT: the port stays ours across restarts.

    A bind without SO_REUSEPORT first proves that nothing listens there:
    SO_REUSEPORT alone would also succeed beside the listening workers of
    *another* podterm of the same user, and the two would silently share the
    port.  (Port 0 becomes a real port there.)

    Raises:
        OSError: the port is in use, or the address cannot be bound.
    """
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    probe = _bind(family, address, reuse_port=False)
    address = (address[0], probe.getsockname()[1], *address[2:])
    probe.close()
    return _bind(family, address, reuse_port=True)


# --------------------------------------------------------------------- worker


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process is told, over its inherited pipe.

    Attributes:
        config: the gateway configuration (store and admin token as the
            supervisor resolved them; no ready file: the supervisor writes it).
        role: its index, the worker count, the peers file, the peer secret.
        stale_holders: peer addresses of dead workers it replaces: their
            sessions died with them and are marked closed in the store.
    """

    config: ServeConfig
    role: WorkerRole
    stale_holders: tuple[str, ...] = ()


def _read_spec(fd: int) -> WorkerSpec:
    def read_exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise EOFError("the supervisor closed the spec pipe early")
            data += chunk
        return data

    (length,) = _LENGTH.unpack(read_exactly(_LENGTH.size))
    # The pipe is private to this process and its parent (same user): the
    # spec is trusted as much as the command line would be.
    spec = pickle.loads(read_exactly(length))  # noqa: S301
    if not isinstance(spec, WorkerSpec):
        raise TypeError(f"expected a WorkerSpec, got {type(spec).__name__}")
    return spec


async def _close_stale(gateway: Any, holders: Sequence[str]) -> None:
    """Mark the non-agent sessions of dead workers closed (their shells died with them)."""
    from podterm.store import StoreError

    try:
        records = await gateway.store.list_sessions()
        closed = 0
        for record in records:
            if (record.holder in holders and record.state != "closed"
                    and record.upstream_kind != "agent"):
                await gateway.store.put_session(dataclasses.replace(record, state="closed"))
                closed += 1
    except StoreError as exc:
        log.warning("worker.stale.failed: %s (those records stay as they were)", exc)
        return
    if closed:
        log.info("worker.stale: %d sessions of a dead worker marked closed", closed)


def _first_failure(group: BaseExceptionGroup[_Failed]) -> _Failed:
    """The first :class:`_Failed` in ``group`` (nurseries nest their groups)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_failure(exc)
        return exc
    raise AssertionError("an empty exception group")


def _single(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one exception inside nested one-member groups, else the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _worker_main(spec: WorkerSpec, lifeline_fd: int, status_fd: int) -> None:
    try:
        await _run_worker(spec, lifeline_fd, status_fd)
    except BaseExceptionGroup as group:
        # Nurseries only wrap: raise a lone ConfigError / OSError bare for worker_entry.
        single = _single(group)
        if single is group:
            raise
        raise single from None


async def _run_worker(spec: WorkerSpec, lifeline_fd: int, status_fd: int) -> None:
    from podterm.gateway.server import Gateway, GatewayOptions, serve

    options = GatewayOptions(handle_signals=True, worker=spec.role)
    lifeline = trio.lowlevel.FdStream(lifeline_fd)
    async with trio.open_nursery() as nursery:

        async def run_gateway(task_status: trio.TaskStatus[Gateway]) -> None:
            await serve(spec.config, options=options, task_status=task_status)
            nursery.cancel_scope.cancel()  # drained: the watchers end too

        gateway: Gateway = await nursery.start(run_gateway)

        async def watch_supervisor() -> None:
            # EOF (or an error) on the spec pipe: the supervisor is gone.
            try:
                while await lifeline.receive_some(1024):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            log.warning("worker.orphaned: the supervisor exited; draining")
            gateway.shutdown("the supervisor exited")

        nursery.start_soon(watch_supervisor)
        if spec.stale_holders:
            nursery.start_soon(_close_stale, gateway, spec.stale_holders)
        report = {"index": spec.role.index, "pid": os.getpid(), "url": gateway.url,
                  "peer": gateway.peer_address}
        async with trio.lowlevel.FdStream(status_fd) as status:
            try:
                await status.send_all(json.dumps(report).encode("utf-8") + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                gateway.shutdown("the supervisor exited")


def worker_entry(argv: Sequence[str]) -> int:
    """``python -m podterm.gateway.workers --worker SPEC_FD STATUS_FD`` (the supervisor runs it)."""
    if len(argv) != 3 or argv[0] != "--worker" or not all(a.isdigit() for a in argv[1:]):
        print("usage: python -m podterm.gateway.workers --worker SPEC_FD STATUS_FD "
              "(started by podterm serve --workers N)", file=sys.stderr)
        return 2
    spec_fd, status_fd = int(argv[1]), int(argv[2])
    spec = _read_spec(spec_fd)
    config = spec.config
    from podterm import logs

    logs.configure(config.logging.format, config.logging.level, levels=config.logging.levels)
    try:
        trio.run(_worker_main, spec, spec_fd, status_fd)
    except ConfigError as exc:
        print(f"podterm serve (worker {spec.role.index}): {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"podterm serve (worker {spec.role.index}): cannot listen on "
              f"{config.listen.host}:{config.listen.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------- supervisor


class _Slot:
    """One worker index: its current process and its restart history."""

    __slots__ = ("index", "process", "peer", "pid", "restarts", "backoff", "started_at",
                 "lifeline")

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: trio.Process | None = None
        self.peer = ""
        self.pid = 0
        self.restarts: deque[float] = deque()
        self.backoff = Backoff(0.5, 10.0)
        self.started_at = 0.0
        self.lifeline: trio.lowlevel.FdStream | None = None


class _Failed(Exception):
    """A worker could not be started or kept running; ``code`` is the exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Supervisor:
    """Runs and supervises the workers (see the module docstring).

    Args:
        config: the configuration ``podterm serve`` was given (``workers.count`` > 1).
        print_banner: print the web terminal URL once every worker listens.
    """

    def __init__(self, config: ServeConfig, *, print_banner: bool = True) -> None:
        self.config = config
        self.count = config.workers.count
        self.print_banner = print_banner
        self.dir = Path(tempfile.mkdtemp(prefix="podterm-workers-"))  # 0700
        self.peers_file = self.dir / "peers.json"
        self.slots = [_Slot(i) for i in range(self.count)]
        self.stopping = False
        self._stopped = trio.Event()
        self.stop_signal = signal.SIGTERM
        self.ready = False
        self.url = ""
        self.failure: _Failed | None = None
        self._pin: socket.socket | None = None
        self._worker_config = config
        self._role_secret = b""
        self._token_generated = False
        self._nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        live = sum(1 for s in self.slots if s.process is not None)
        return f"<Supervisor {self.url or 'starting'} workers={live}/{self.count}>"

    # ------------------------------------------------------------ preparing

    def _prepare(self) -> None:
        """Resolve what every worker must share: port, store, admin token, peer secret.

        Raises:
            ConfigError: the peer secret file cannot be used.
            OSError: the port cannot be bound.
        """
        config = self.config
        cluster = config.cluster
        secret = (load_peer_secret(cluster.peer_secret_file) if cluster.peer_secret_file
                  else secrets.token_bytes(32))
        self._role_secret = secret
        auth = config.auth
        if auth.admin_token is None and not auth.token_file:
            from podterm.auth.authn import generate_admin_token

            auth = dataclasses.replace(auth, admin_token=generate_admin_token())
            self._token_generated = True
        store = config.store
        if store.scheme == "memory":
            path = self.dir / "store.db"
            log.warning("workers.store: memory:// lives in one process; the %d workers share "
                        "a private SQLite file %s instead (removed at exit, so sessions do "
                        "not outlive the supervisor); use --store sqlite:///PATH or "
                        "redis://HOST:PORT to choose", self.count, path)
            store = StoreConfig(url=f"sqlite:///{path}")
        self._pin = _pin_port(config.listen.host, config.listen.port)
        port = self._pin.getsockname()[1]
        self._worker_config = dataclasses.replace(
            config, listen=dataclasses.replace(config.listen, port=port), store=store,
            auth=auth, ready_file=None)

    async def _init_store(self) -> None:
        """Before the workers start: the SQLite schema, and records of dead workers.

        SQLite's schema is created once here, before several workers race to.
        Records held by workers of an earlier run on this machine (their peer
        ports are gone: nothing answers there) are marked closed unless they
        are agent sessions (the agent brings those back): their shells died
        with those workers, and a client resuming one would otherwise be told
        to retry for ever.  Only holders on this machine's peer host are
        probed, and only where that host is this machine's alone (SQLite, or
        ``--advertise`` set).
        """
        url = self._worker_config.store.url
        sqlite = url.startswith("sqlite:")
        advertise = self.config.cluster.advertise
        if not sqlite and advertise is None:
            return
        from podterm.store import StoreError, open_store, running

        host = parse_peer_address(advertise)[0] if advertise else "127.0.0.1"
        dead: set[str] = set()
        closed = 0
        try:
            # Bounded: a store that is down now is the workers' problem, not the start's.
            with trio.move_on_after(START_TIMEOUT_S / 6) as timeout:
                async with running(open_store(url)) as store:
                    await store.wait_available()
                    records = await store.list_sessions()
                    holders = {r.holder for r in records
                               if r.state != "closed" and r.upstream_kind != "agent"
                               and r.holder and _host_of(r.holder) == host}
                    dead = {h for h in holders if not await _answers(h)}
                    for record in records:
                        if (record.holder in dead and record.state != "closed"
                                and record.upstream_kind != "agent"):
                            await store.put_session(dataclasses.replace(record, state="closed"))
                            closed += 1
        except* StoreError as group:
            # (The workers report a store they cannot use themselves, exit 2.)
            log.warning("workers.stale.failed: %s (records of earlier workers stay)",
                        group.exceptions[0])
            closed = 0
        if timeout.cancelled_caught:
            log.warning("workers.stale.failed: the store did not answer within %gs (records "
                        "of earlier workers stay)", START_TIMEOUT_S / 6)
        if closed:
            log.info("workers.stale: %d sessions of %d earlier workers marked closed", closed,
                     len(dead))

    # ------------------------------------------------------------- workers

    def _write_peers(self) -> None:
        data = {"workers": {str(s.index): s.peer for s in self.slots if s.peer}}
        tmp = self.peers_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.peers_file)

    async def _spawn(self, slot: _Slot, stale: tuple[str, ...]) -> trio.Process:
        role = WorkerRole(index=slot.index, count=self.count, peers_file=str(self.peers_file),
                          secret=self._role_secret)
        payload = pickle.dumps(WorkerSpec(self._worker_config, role, stale))
        spec_r, spec_w = os.pipe()
        status_r, status_w = os.pipe()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "podterm.gateway.workers", "--worker", str(spec_r),
                 str(status_w)],
                stdin=subprocess.DEVNULL, pass_fds=(spec_r, status_w),
                # Its own session: a terminal's Ctrl-C (sent to the whole
                # foreground group) reaches the supervisor only, which passes
                # one signal on; a second one would interrupt the drain.
                start_new_session=True)
        except BaseException:
            for fd in (spec_r, spec_w, status_r, status_w):
                os.close(fd)
            raise
        os.close(spec_r)
        os.close(status_w)
        lifeline = trio.lowlevel.FdStream(spec_w)
        slot.lifeline = lifeline
        slot.process = process
        slot.pid = process.pid
        slot.started_at = trio.current_time()
        try:
            await lifeline.send_all(_LENGTH.pack(len(payload)) + payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died at once; its exit status says why
        slot.peer = ""
        async with trio.lowlevel.FdStream(status_r) as status:
            line = b""
            with trio.move_on_after(START_TIMEOUT_S) as timeout:
                while not line.endswith(b"\n"):
                    try:
                        chunk = await status.receive_some(4096)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        chunk = b""
                    if not chunk:
                        break
                    line += chunk
        if timeout.cancelled_caught:
            log.error("workers.start.timeout: worker %d did not listen within %gs; killing it",
                      slot.index, START_TIMEOUT_S)
            process.kill()
        elif line:
            try:
                report = json.loads(line)
                slot.peer = str(report["peer"])
                self.url = self.url or str(report["url"])
            except (ValueError, KeyError, TypeError):
                log.error("workers.start.failed: worker %d reported %r", slot.index, line[:200])
                process.kill()
        return process

    async def _run_slot(self, slot: _Slot) -> None:
        stale: tuple[str, ...] = ()
        while True:
            process = await self._spawn(slot, stale)
            if slot.peer:
                self._write_peers()
                log.info("workers.worker.ready %d pid %d peer %s", slot.index, process.pid,
                         slot.peer)
                if not self.ready and all(s.peer for s in self.slots):
                    self.ready = True
                    self._announce()
            code = await process.wait()
            if slot.lifeline is not None:
                await slot.lifeline.aclose()
                slot.lifeline = None
            slot.process = None
            dead_peer, slot.peer = slot.peer, ""
            if self.stopping:
                # Killed by the signal it was sent before it could handle it
                # (still starting) is a clean stop too.
                if code not in (0, -int(self.stop_signal)):
                    log.warning("workers.worker.exit %d: status %d", slot.index, code)
                    self.failure = self.failure or _Failed(1, f"worker {slot.index} exited "
                                                              f"with status {code}")
                return
            if not self.ready:
                # A worker that cannot start ends the start (e.g. 2: bad config).
                raise _Failed(code if code > 0 else 1,
                              f"worker {slot.index} exited with status {code} while starting")
            now = trio.current_time()
            if now - slot.started_at >= RESTART_WINDOW_S / 2:
                slot.backoff.reset()
            slot.restarts.append(now)
            while slot.restarts and now - slot.restarts[0] > RESTART_WINDOW_S:
                slot.restarts.popleft()
            if len(slot.restarts) > MAX_RESTARTS:
                raise _Failed(1, f"worker {slot.index} exited {len(slot.restarts)} times within "
                                 f"{RESTART_WINDOW_S:g}s (status {code}); giving up")
            delay = next(slot.backoff)
            log.warning("workers.worker.died %d: status %d; restarting in %.2fs", slot.index,
                        code, delay)
            if dead_peer:
                self._write_peers()
                stale = (*stale, dead_peer)[-16:]
            with trio.move_on_after(delay):
                await self._stopped.wait()  # a stop ends the wait: nothing to restart
            if self.stopping:
                return

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                try:
                    process.send_signal(signum)
                except ProcessLookupError:
                    pass

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask every worker to drain, once (later calls only log)."""
        if self.stopping:
            log.info("workers.stop: already draining; workers still running are killed "
                     "%gs after the drain timeout", EXIT_GRACE_S)
            return
        self.stopping = True
        self._stopped.set()
        self.stop_signal = signal.Signals(signum)
        self._signal_all(signum)
        nursery = self._nursery
        if nursery is not None:
            nursery.start_soon(self._kill_after_grace)

    async def _kill_after_grace(self) -> None:
        await trio.sleep(self.config.sessions.drain_timeout_s + EXIT_GRACE_S)
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                log.error("workers.worker.kill %d: still running after the drain", slot.index)
                slot.process.kill()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self.stopping:
                    log.info("workers.signal %s: draining %d workers",
                             signal.Signals(signum).name, self.count)
                self.stop(signum)

    def _announce(self) -> None:
        from podterm.gateway.server import _write_ready_file

        token = self._worker_config.auth.admin_token if self._token_generated else None
        if self.config.ready_file:
            payload: dict[str, Any] = {"url": self.url, "pid": os.getpid(),
                                       "workers": self.count}
            if token is not None:
                payload["token"] = token
            _write_ready_file(self.config.ready_file, payload)
        if self.print_banner:
            lines = [f"podterm gateway listening on {self.url} ({self.count} workers)"]
            if token is not None:
                lines.append(f"  web terminal: {self.url}/#token={token}")
                lines.append(f"  CLI: export PODTERM_SERVER={self.url} PODTERM_TOKEN={token}")
            else:
                lines.append(f"  web terminal: {self.url}/")
            print("\n".join(lines), file=sys.stdout, flush=True)
        log.info("workers.start.complete %s: %d workers", self.url, self.count)

    async def run(self, *, handle_signals: bool = True) -> int:
        """Start the workers, supervise them, return the exit status once all have exited.

        Raises:
            ConfigError: the peer secret file cannot be used.
            OSError: the port cannot be bound.
        """
        try:
            self._prepare()
            await self._init_store()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if handle_signals:
                        nursery.start_soon(self._watch_signals)
                    # Ends once every slot has returned: after a stop, all exited.
                    async with trio.open_nursery() as slots:
                        for slot in self.slots:
                            slots.start_soon(self._run_slot, slot)
                    nursery.cancel_scope.cancel()  # the signal watcher, the kill timer
            except* _Failed as group:
                failed = _first_failure(group)
                self.failure = failed
                log.error("workers.failed: %s", failed)
                print(f"podterm serve: {failed}", file=sys.stderr)
            if self.failure is not None:
                await self._stop_all()
            return self.failure.code if self.failure is not None else 0
        finally:
            self._nursery = None
            if self._pin is not None:
                self._pin.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _stop_all(self) -> None:
        """After a failure: drain whatever still runs, kill it after the grace."""
        self.stopping = True
        self._stopped.set()
        self._signal_all(signal.SIGTERM)
        with trio.move_on_after(self.config.sessions.drain_timeout_s + EXIT_GRACE_S):
            for slot in self.slots:
                if slot.process is not None:
                    await slot.process.wait()
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.kill()
                with trio.CancelScope(shield=True):
                    await slot.process.wait()


def serve_exit_status(config: ServeConfig, run: Callable[[], int | None]) -> int:
    """``podterm serve``'s exit status for ``run()``: its own (None is 0), 2 for a
    configuration error, 1 when the listener cannot be bound (each said on stderr)."""
    try:
        return run() or 0
    except ConfigError as exc:
        print(f"podterm serve: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"podterm serve: cannot listen on {config.listen.host}:{config.listen.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1


def main(config: ServeConfig, *, print_banner: bool = True) -> int:
    """``podterm serve --workers N`` (N > 1): the supervisor; 0 once every worker drained."""
    supervisor = Supervisor(config, print_banner=print_banner)
    return serve_exit_status(config, lambda: trio.run(supervisor.run))


if __name__ == "__main__":
    # Run as ``python -m``, this file is ``__main__``: import it under its own
    # name, so the spec unpickles as podterm.gateway.workers.WorkerSpec.
    from podterm.gateway import workers as _workers

    sys.exit(_workers.worker_entry(sys.argv[1:]))

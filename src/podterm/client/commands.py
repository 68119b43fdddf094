"""``podterm exec | attach | join | sessions | kill``: the client commands.

``podterm.cli`` parses the command line into a :class:`~podterm.config.ClientOptions`
and calls one of the ``run_*`` functions here; each returns the exit status
(spec/cli.md): 0 success, 1 a run-time failure (the caller prints the
:class:`~podterm.errors.PodtermError` message), and for ``exec``/``attach``
the remote command's own status (128+N when killed by signal N).

``exec`` follows kubectl: ``-i`` forwards stdin, ``-t`` asks for a terminal;
with no command it is an interactive shell (``-i -t`` implied).  Without a
terminal, the end of the local stdin ends the remote command's stdin
(``stdin_eof``, as kubectl's v5 close), so ``echo x | podterm exec -i POD --
cat`` finishes.  A terminal
is only used when stdin is one: ``-t`` with piped input prints kubectl's
warning and runs without.  In a terminal session the local tty is in raw mode
(every key, ^C included, goes to the remote side) and restored on every exit
path; SIGWINCH resizes the remote terminal.

Leaving without ending the session: ``~.`` at the start of a line (ssh's
escape; ``~~`` types a ``~``) detaches, even while the link is down, and
prints the ``podterm attach ID`` that resumes it.

Signals the CLI still receives (a session without a terminal, or sent by
another process): SIGINT ends ``exec``'s session as kubectl's ^C would;
SIGTERM and SIGHUP leave the session running and say how to resume it.
``join`` (a viewer in cooked mode) just leaves on ^C.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import trio

from podterm.client.http import ApiClient, make_ssl_context, parse_server
from podterm.client.resume import LinkStatus, OutputChunk, ResumableSession, SessionEnd
from podterm.client.terminal import EscapeScanner, Terminal, TerminalSignal, terminal_size
from podterm.config import ClientOptions
from podterm.errors import PodtermError
from podterm.protocol.events import Gap, Hello

__all__ = ["run_attach", "run_exec", "run_join", "run_kill", "run_sessions"]

_KUBECTL_TTY_WARNING = ("Unable to use a TTY - input is not a terminal or the right kind of "
                        "file")


# ---- entry points ---------------------------------------------------------------------------


def run_exec(opts: ClientOptions) -> int:
    """Create a session and attach to it as the writer; return the remote exit status."""
    return trio.run(_exec, opts)


def run_attach(opts: ClientOptions) -> int:
    """Attach to session ``opts.session_id`` as the writer; return the remote exit status."""
    return trio.run(_attach, opts, "rw")


def run_join(opts: ClientOptions) -> int:
    """Watch session ``opts.session_id`` read-only; return the remote exit status."""
    return trio.run(_attach, opts, "ro")


def run_sessions(opts: ClientOptions) -> int:
    """List sessions as a table, ``-o wide`` or ``-o json``."""
    return trio.run(_sessions, opts)


def run_kill(opts: ClientOptions) -> int:
    """End session ``opts.session_id``."""
    return trio.run(_kill, opts)


# ---- shared -----------------------------------------------------------------------------------


def api_client(opts: ClientOptions) -> ApiClient:
    """The REST client for ``opts`` (TLS context only for ``https``)."""
    address = parse_server(opts.server)
    ctx = make_ssl_context(opts.ca_file, opts.insecure) if address.tls else None
    return ApiClient(address, opts.token, ssl_context=ctx)


def _stdin_is_tty() -> bool:
    try:
        return os.isatty(0)
    except OSError:
        return False


async def _exec(opts: ClientOptions) -> int:
    api = api_client(opts)
    tty = opts.tty
    if tty and not _stdin_is_tty():
        if opts.command:
            print(_KUBECTL_TTY_WARNING, file=sys.stderr)
        tty = False
    body: dict[str, Any] = {"command": list(opts.command) if opts.command else None,
                            "tty": tty}
    size = terminal_size(0) if tty else None
    if size is not None:
        body["size"] = {"cols": size[0], "rows": size[1]}
    if tty and opts.term:
        body["env"] = {"TERM": opts.term}
    for key in ("namespace", "pod", "container", "upstream"):
        value = getattr(opts, key)
        if value:
            body[key] = value
    created = await api.create_session(body)
    session_id = str(created["id"])
    token = created.get("resume_token")
    return await _run_session(api, session_id, mode="rw", resume_token=token,
                              read_stdin=opts.stdin, tty=tty, kill_on_interrupt=True,
                              eof_closes_stdin=not tty)


async def _attach(opts: ClientOptions, mode: Literal["rw", "ro"]) -> int:
    api = api_client(opts)
    assert opts.session_id is not None, "cli.py checks the ID"
    info = await api.get_session(opts.session_id)
    tty = bool(info.get("tty")) and _stdin_is_tty()
    # The end of our stdin ends the remote one only for a session without a
    # terminal (kubectl attach -i); a terminal session's shell is never sent EOF.
    return await _run_session(api, opts.session_id, mode=mode, resume_token=None,
                              read_stdin=mode == "rw", tty=tty, kill_on_interrupt=False,
                              eof_closes_stdin=mode == "rw" and not info.get("tty"))


async def _run_session(api: ApiClient, session_id: str, *, mode: Literal["rw", "ro"],
                       resume_token: str | None, read_stdin: bool, tty: bool,
                       kill_on_interrupt: bool, eof_closes_stdin: bool = False) -> int:
    """Attach, pump the terminal both ways until the session ends; return the exit status.

    With ``eof_closes_stdin`` (a session without a terminal), the end of the
    local stdin closes the session's stdin; otherwise reading just stops.
    """
    end: SessionEnd | None = None
    stopped_by: int | None = None
    mid_line = False
    with Terminal(raw=tty and mode == "rw", read_stdin=read_stdin) as term:
        delivered = False

        async def on_output(chunk: OutputChunk) -> None:
            nonlocal delivered
            delivered = True
            await term.write_output(chunk.data, stderr=chunk.stderr)

        async def on_status(status: LinkStatus) -> None:
            if status.state == "reconnecting":
                await term.show_status(status.describe())
            elif status.state == "reconnected":
                await term.clear_status()

        async def on_gap(gap: Gap) -> None:
            # Attaching from offset 0 to a session whose ring has moved on is
            # normal for attach/join: only a gap after output was shown is news.
            if delivered or gap.from_offset > 0:
                await term.print_message(
                    f"podterm: {gap.lost} bytes of output were lost while disconnected")

        async def on_hello(hello: Hello) -> None:
            for notice in hello.notices:
                await term.print_message(f"podterm: {notice}")

        session = ResumableSession(
            lambda offset, m, token: api.attach_url(session_id, offset=offset, mode=m,
                                                    resume_token=token),
            headers=api.auth_headers(), mode=mode, resume_token=resume_token,
            on_output=on_output, on_status=on_status, on_gap=on_gap, on_hello=on_hello,
            ssl_context=api.ssl_context if api.address.tls else None)
        if tty and mode == "rw":
            size = term.size()
            if size is not None:
                session.resize_nowait(*size)
        try:
            try:
                async with trio.open_nursery() as nursery:

                    def detach() -> None:
                        # Polite when attached (the gateway closes with 1000 and
                        # run() returns "detached"); if the link is down, or the
                        # gateway does not answer in time, leave anyway.
                        session.detach_nowait()
                        nursery.start_soon(_give_up_after, 3.0, nursery.cancel_scope)

                    await nursery.start(term.watch_exit_signals)
                    if tty and mode == "rw":
                        await nursery.start(term.watch_resize, _resizer(session))
                    if read_stdin:
                        nursery.start_soon(_pump_stdin, term, session,
                                           detach if tty and mode == "rw" else None,
                                           eof_closes_stdin)
                    end = await session.run()
                    nursery.cancel_scope.cancel()
                if end is None:
                    end = SessionEnd(None, None, "detached")
            except BaseExceptionGroup as group:
                raise _unwrap(group) from None
        except TerminalSignal as sig:
            stopped_by = sig.signum
        # Messages start on a fresh line, whatever the session left on the last one.
        mid_line = term.lines.redraw() != b""
    # The terminal is restored from here on: plain lines.
    if mid_line and os.isatty(2):
        sys.stderr.write("\n")
    if stopped_by is not None:
        if mode == "ro":
            return 128 + stopped_by  # a viewer leaving changes nothing: no message
        return await _after_signal(api, session_id, stopped_by, kill_on_interrupt)
    assert end is not None
    _final_message(end, session_id)
    return end.exit_status


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    for exc in leaves:
        if isinstance(exc, TerminalSignal):
            return exc
    return leaves[0] if len(leaves) == 1 else group


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


async def _give_up_after(seconds: float, scope: trio.CancelScope) -> None:
    await trio.sleep(seconds)
    scope.cancel()


def _resizer(session: ResumableSession) -> Callable[[int, int], Awaitable[None]]:
    async def resize(cols: int, rows: int) -> None:
        session.resize_nowait(cols, rows)
        await trio.lowlevel.checkpoint()
    return resize


async def _pump_stdin(term: Terminal, session: ResumableSession,
                      on_detach: Callable[[], None] | None,
                      eof_closes_stdin: bool = False) -> None:
    """Forward typed input; with ``on_detach``, ``~.`` at a line start calls it (ssh's escape).

    At the end of the local stdin, ``eof_closes_stdin`` ends the session's
    stdin after the last byte (``stdin_eof``); otherwise reading just stops
    and the session goes on.
    """
    escapes = EscapeScanner() if on_detach is not None else None
    while True:
        data = await term.read_stdin_some()
        if not data:
            if eof_closes_stdin:
                session.close_stdin_nowait()
            return
        if escapes is not None and on_detach is not None:
            data, detach = escapes.feed(data)
            if data:
                await session.send_stdin(data)
            if detach:
                on_detach()
                return
            continue
        await session.send_stdin(data)


async def _after_signal(api: ApiClient, session_id: str, signum: int,
                        kill_on_interrupt: bool) -> int:
    if signum == signal.SIGINT and kill_on_interrupt:
        with trio.move_on_after(5):
            try:
                await api.kill_session(session_id)
            except PodtermError:
                pass
        return 128 + signum
    print(f"podterm: detached ({signal.Signals(signum).name}); the session keeps running "
          f"for its grace period.\nResume it with: podterm attach {session_id}", file=sys.stderr)
    return 128 + signum


def _final_message(end: SessionEnd, session_id: str) -> None:
    """Say why the session ended, when it is not a plain success (as kubectl does)."""
    if end.reason == "detached":
        print(f"podterm: detached; the session keeps running for its grace period.\n"
              f"Resume it with: podterm attach {session_id}", file=sys.stderr)
        return
    if end.code is not None:
        if end.code != 0:
            print(f"podterm: command terminated with exit code {end.code}", file=sys.stderr)
        return
    if end.signal is not None:
        name = _signal_name(end.signal)
        print(f"podterm: command terminated by signal {name} ({end.reason})", file=sys.stderr)
        return
    print(f"podterm: session ended ({end.reason})", file=sys.stderr)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


# ---- sessions, kill ---------------------------------------------------------------------------


async def _sessions(opts: ClientOptions) -> int:
    api = api_client(opts)
    items = await api.list_sessions(all_users=opts.all_sessions)
    if opts.output == "json":
        print(json.dumps({"items": items}, indent=2, sort_keys=True))
        return 0
    print(format_sessions(items, wide=opts.output == "wide", now=time.time()), end="")
    return 0


async def _kill(opts: ClientOptions) -> int:
    api = api_client(opts)
    assert opts.session_id is not None, "cli.py checks the ID"
    session = await api.kill_session(opts.session_id)
    print(f"session {session.get('id', opts.session_id)} killed")
    return 0


def format_sessions(items: list[dict[str, Any]], *, wide: bool = False,
                    now: float | None = None) -> str:
    """The ``podterm sessions`` table (kubectl style: upper-case headers, aligned columns)."""
    now = time.time() if now is None else now
    headers = ["ID", "STATE", "OWNER", "TARGET", "TTY", "CLIENTS", "AGE", "COMMAND"]
    if wide:
        headers += ["UPSTREAM", "SIZE", "OUT", "IN", "EXIT"]
    rows = [headers]
    for item in items:
        target = f"{item.get('namespace') or '-'}/{item.get('pod') or '-'}"
        if item.get("container"):
            target += f"/{item['container']}"
        command = item.get("command")
        command_text = " ".join(command) if command else "(shell)"
        if len(command_text) > 40:
            command_text = command_text[:39] + "…"
        row = [str(item.get("id", "")), str(item.get("state", "")), str(item.get("owner", "")),
               target, "yes" if item.get("tty") else "no",
               f"{item.get('writers', 0)}w/{item.get('viewers', 0)}v",
               _age(item.get("created_at"), now), command_text]
        if wide:
            size = item.get("size") or {}
            exit_obj = item.get("exit")
            exit_text = "-"
            if isinstance(exit_obj, dict):
                if exit_obj.get("code") is not None:
                    exit_text = str(exit_obj["code"])
                elif exit_obj.get("signal") is not None:
                    exit_text = f"signal {exit_obj['signal']}"
                else:
                    exit_text = str(exit_obj.get("reason", "-"))
            row += [str(item.get("upstream", "")), f"{size.get('cols', '?')}x{size.get('rows', '?')}",
                    str(item.get("out_offset", 0)), str(item.get("in_offset", 0)), exit_text]
        rows.append(row)
    if len(rows) == 1:
        return "No sessions.\n"
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = ["   ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def _age(created_at: Any, now: float) -> str:
    """kubectl-style age: 42s, 5m, 3h, 2d."""
    if not isinstance(created_at, str):
        return "-"
    try:
        created = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    seconds = max(0, int(now - created.timestamp()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"

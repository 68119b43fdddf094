"""Session recordings through a real gateway: what a client saw is in the .cast file.

Files are validated twice: by podterm's strict asciicast v2 parser and by the
asciinema package's own reader (required under CI, as in test_recording.py).
A recording that cannot be written closes its session, and only that one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from podterm.audit import MemorySink
from podterm.config import ListenConfig, RecordingConfig, ServeConfig, load_serve_config
from podterm.errors import ConfigError
from podterm.gateway.server import serve
from podterm.recording import Event, Header, RecordingWriter, parse

if TYPE_CHECKING:
    from conftest import GatewayFactory

WAIT_S = 10.0


def check_cast(path: Path) -> tuple[Header, list[Event]]:
    """Strict asciicast v2 validation, then asciinema's reader: both must agree."""
    header, events = parse(path.read_bytes())
    times = [e.time for e in events]
    assert times == sorted(times)
    try:
        from asciinema.asciicast import v2
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the asciinema package is missing (pip install asciinema)",
                        pytrace=False)
        return header, events
    with path.open(encoding="utf-8") as f:
        first = f.readline()
        with v2.open_from_file(first, f) as cast:
            a_header: dict[str, Any] = cast.v2_header
            a_events = list(cast.events())
    assert (a_header["version"], a_header["width"], a_header["height"]) == \
        (2, header.width, header.height)
    assert [[e.time, e.code, e.data] for e in events] == a_events
    return header, events


@pytest.mark.trio
async def test_a_sessions_output_and_resizes_are_in_its_cast_file(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    rec_dir = tmp_path / "rec"
    gateway = await make_gateway(recording=RecordingConfig(dir=str(rec_dir)))
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], size={"cols": 90, "rows": 20})
        session = gateway.registry.get(created["id"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await client.send_resize(100, 30)
        await client.send_stdin("héllo\n".encode())
        await client.wait_output("héllo\r\nhéllo\r\n".encode())
        await client.send_resize(120, 40)
        await client.send_stdin(b"bye\n\x04")
        assert await client.wait_closed() == 1000
        await session.wait_closed()
        await gateway.gw.recordings.wait_flushed()
    path = rec_dir / f"{created['id']}.cast"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(rec_dir).st_mode & 0o777 == 0o700
    header, events = check_cast(path)
    assert (header.width, header.height) == (90, 20)
    assert header.title == "admin@default/local"
    assert header.command == "cat"
    assert set(header.env) == {"SHELL", "TERM"}
    assert isinstance(header.timestamp, int)
    # Exactly what the client was sent, byte for byte (no output unrecorded).
    assert "".join(e.data for e in events if e.code == "o") == client.output.decode()
    assert [e.data for e in events if e.code == "r"] == ["100x30", "120x40"]
    assert not [e for e in events if e.code == "i"]  # input is off by default


@pytest.mark.trio
async def test_input_is_recorded_only_when_asked(make_gateway: GatewayFactory,
                                                tmp_path: Path) -> None:
    gateway = await make_gateway(recording=RecordingConfig(dir=str(tmp_path),
                                                           record_input=True))
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        session = gateway.registry.get(created["id"])
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await client.send_stdin(b"typed\n")
        await client.wait_output(b"typed\r\ntyped\r\n")
        await client.send_stdin(b"\x04")
        await client.wait_closed()
        await session.wait_closed()
        await gateway.gw.recordings.wait_flushed()
    _, events = check_cast(tmp_path / f"{created['id']}.cast")
    assert "".join(e.data for e in events if e.code == "i") == "typed\n\x04"


@pytest.mark.trio
async def test_a_recording_that_cannot_be_written_closes_that_session_only(
        make_gateway: GatewayFactory, tmp_path: Path) -> None:
    # One open file at most: a session's file is reopened for each of its
    # writes once another session wrote, so it can be swapped for /dev/full.
    writer = RecordingWriter(tmp_path, max_open_files=1, flush_interval_s=0)
    audit = MemorySink()
    gateway = await make_gateway(options={"recording_writer": writer, "audit_sink": audit})
    with trio.fail_after(WAIT_S):
        victim_info = await gateway.create(["cat"])
        other_info = await gateway.create(["cat"])
        victim = await gateway.attach(victim_info["id"])
        other = await gateway.attach(other_info["id"])
        await victim.wait_hello()
        await other.wait_hello()
        await victim.send_stdin(b"a\n")
        await victim.wait_output(b"a\r\na\r\n")
        await writer.wait_flushed()
        await other.send_stdin(b"b\n")
        await other.wait_output(b"b\r\nb\r\n")
        await writer.wait_flushed()  # the victim's descriptor is closed now
        path = tmp_path / f"{victim_info['id']}.cast"
        path.unlink()
        path.symlink_to("/dev/full")  # its next write fails: ENOSPC

        await victim.send_stdin(b"c\n")
        assert await victim.wait_closed() == 4410
        assert victim.exit is not None and victim.exit.reason == "recording_failed"
        failure, = await audit.wait_for("recording.failure")
        end, = await audit.wait_for("session.end")

        # The other session is untouched and still recorded.
        await other.send_stdin(b"d\n")
        await other.wait_output(b"d\r\nd\r\n")
        assert gateway.registry.get(other_info["id"]).recorder is not None
        await other.send_stdin(b"\x04")
        await other.wait_closed()
    assert failure.target.session == victim_info["id"]
    assert failure.details["path"] == str(path)
    assert "No space left" in failure.details["error"]
    assert end.target.session == victim_info["id"]
    assert end.outcome == "error" and end.details["reason"] == "recording_failed"
    assert writer.statistics().failures == 1


@pytest.mark.trio
async def test_recording_off_runs_sessions_without_a_recorder(
        make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(recording=RecordingConfig(dir=None))
    assert gateway.gw.recordings is None
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"])
        assert gateway.registry.get(created["id"]).recorder is None
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await client.send_stdin(b"x\n\x04")
        assert await client.wait_closed() == 1000


@pytest.mark.trio
async def test_a_recordings_directory_that_cannot_be_made_stops_the_start(
        tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = ServeConfig(listen=ListenConfig(host="127.0.0.1", port=0),
                         recording=RecordingConfig(dir=str(blocker / "rec")))
    with trio.fail_after(WAIT_S), pytest.raises(ConfigError, match="recordings directory"):
        await serve(config)


def test_recording_is_on_by_default_in_the_users_state_directory(tmp_path: Path) -> None:
    state = load_serve_config({}, {"XDG_STATE_HOME": str(tmp_path)})
    assert state.recording.dir == str(tmp_path / "podterm" / "recordings")
    home = load_serve_config({}, {"HOME": "/home/ada"})
    assert home.recording.dir == "/home/ada/.local/state/podterm/recordings"
    relative = load_serve_config({}, {"XDG_STATE_HOME": "state", "HOME": "/home/ada"})
    assert relative.recording.dir == "/home/ada/.local/state/podterm/recordings"
    assert load_serve_config({}, {}).recording.dir is None  # nowhere to put them
    off = load_serve_config({"recordings": "off"}, {"HOME": "/home/ada"})
    assert off.recording.dir is None
    assert load_serve_config({}, {"HOME": "/h", "PODTERM_RECORDINGS": "off"}).recording.dir \
        is None
    chosen = load_serve_config({"recordings": str(tmp_path)}, {"HOME": "/h"})
    assert chosen.recording.dir == str(tmp_path)
    assert load_serve_config({"record_input": True}, {}).recording.record_input is True

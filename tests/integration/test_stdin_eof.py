"""podterm.v1 ``stdin_eof`` (docs/protocol.md §4) against a real gateway and real processes.

A no-tty ``cat`` ends only when its stdin ends, so its EXIT proves the EOF
arrived, and its output proves every input byte arrived exactly once before
it.  The server side is driven directly (``ProtoClient``: exact messages,
exact cuts); the client side through :class:`ResumableSession` and a proxy
that cuts the connection between the data and the EOF.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from tests.helpers.cutproxy import open_cut_proxy

from podterm.client.http import ApiClient, parse_server
from podterm.client.resume import LinkStatus, OutputChunk, ResumableSession, SessionEnd
from podterm.errors import CloseCode, LocalProtocolError
from podterm.resilience.backoff import Backoff

if TYPE_CHECKING:
    from conftest import GatewayUnderTest, ProtoClient

pytestmark = pytest.mark.trio

WAIT_S = 10.0
DATA = b"".join(b"line %05d of the input\n" % i for i in range(4000))  # ~92 KB, < one window


async def _send_eof(client: ProtoClient, offset: int) -> None:
    await client.send(client.codec.stdin_eof(offset))


async def _send_all(client: ProtoClient, data: bytes, start: int = 0) -> None:
    """STDIN ``data[start:]`` in 16 KiB messages (the bytes from input offset ``start``)."""
    for pos in range(start, len(data), 16384):
        await client.send_stdin(data[pos:pos + 16384])


async def test_cat_ends_on_stdin_eof_with_all_its_input(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        client = await gateway.attach(created["id"])
        hello = await client.wait_hello()
        assert hello.stdin_closed is False
        await _send_all(client, DATA)
        await _send_eof(client, len(DATA))
        await _send_eof(client, len(DATA))  # a repeat changes nothing
        assert await client.wait_closed() == CloseCode.NORMAL
        assert client.exit is not None and client.exit.code == 0, client.exit
        assert bytes(client.output) == DATA


async def test_eof_ahead_of_its_data_waits_for_it(gateway: GatewayUnderTest) -> None:
    """An EOF offset beyond the input received applies once input reaches it; later bytes go."""
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        client = await gateway.attach(created["id"])
        await client.wait_hello()
        await _send_eof(client, 6)
        await client.send_stdin(b"abc")
        # The session is still reading input: cat has not seen an EOF.
        await client.wait_output(b"abc")
        assert client.exit is None
        await client.send_stdin(b"defXYZ")  # crosses the EOF at 6: "XYZ" is past it
        assert await client.wait_closed() == CloseCode.NORMAL
        assert client.exit is not None and client.exit.code == 0
        assert bytes(client.output) == b"abcdef"


async def test_eof_across_a_cut_between_data_and_eof(gateway: GatewayUnderTest) -> None:
    """Data, a network cut, resume: the re-sent data arrives once, then the EOF ends cat."""
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        first = await gateway.attach(created["id"])
        hello = await first.wait_hello()
        await _send_all(first, DATA)
        await first.cut()  # some of DATA may not have been accepted yet
        second = await gateway.attach(created["id"], offset=first.offset,
                                      resume_token=hello.resume_token)
        resumed = await second.wait_hello()
        assert resumed.out_offset == first.offset
        assert resumed.stdin_closed is False
        assert 0 <= resumed.in_acked <= len(DATA)
        # Re-send from in_acked, as §5 asks; then our EOF, which the old link never sent.
        await _send_all(second, DATA, resumed.in_acked)
        await _send_eof(second, len(DATA))
        assert await second.wait_closed() == CloseCode.NORMAL
        assert second.exit is not None and second.exit.code == 0
        assert bytes(first.output) + bytes(second.output) == DATA


async def test_resume_after_the_eof_was_applied_says_stdin_closed(
        gateway: GatewayUnderTest, tmp_path: Path) -> None:
    """hello.stdin_closed tells a resuming writer not to re-send; a repeat is still harmless."""
    # The process lives on until the test has re-sent (the flag file): its
    # EXIT must not close the resumed link before the re-sends are written.
    flag = tmp_path / "resent"
    with trio.fail_after(WAIT_S):
        created = await gateway.create(
            ["sh", "-c", f"cat; echo EOF-SEEN; while [ ! -e {flag} ]; do sleep 0.01; done; "
                         "read -r x; echo x=$x"], tty=False)
        first = await gateway.attach(created["id"])
        hello = await first.wait_hello()
        await first.send_stdin(b"one\n")
        await _send_eof(first, 4)
        await first.wait_output(b"one\nEOF-SEEN\n")  # cat saw the EOF; so does `read`
        await first.cut()
        second = await gateway.attach(created["id"], offset=first.offset,
                                      resume_token=hello.resume_token)
        resumed = await second.wait_hello()
        assert resumed.stdin_closed is True and resumed.in_acked == 4
        await _send_eof(second, 4)  # a client that re-sends anyway: ignored
        await second.send_stdin(b"late\n")  # past the EOF: acknowledged, discarded
        await second.wait_for(lambda c: 9 in c.in_acks)  # both taken (and dropped)
        flag.touch()
        assert await second.wait_closed() == CloseCode.NORMAL
        assert second.exit is not None and second.exit.code == 0
        assert bytes(first.output) + bytes(second.output) == b"one\nEOF-SEEN\nx=\n"


async def test_viewer_stdin_eof_is_refused_with_1008(gateway: GatewayUnderTest) -> None:
    with trio.fail_after(WAIT_S):
        created = await gateway.create(["cat"], tty=False)
        writer = await gateway.attach(created["id"])
        await writer.wait_hello()
        viewer = await gateway.attach(created["id"], mode="ro")
        await viewer.wait_hello()
        await _send_eof(viewer, 0)
        assert await viewer.wait_closed() == CloseCode.POLICY_VIOLATION
        # The session's input is untouched: the writer still types, then ends it.
        await writer.send_stdin(b"still here\n")
        await writer.wait_output(b"still here\n")
        assert writer.exit is None
        await _send_eof(writer, 11)
        assert await writer.wait_closed() == CloseCode.NORMAL
        assert writer.exit is not None and writer.exit.code == 0
        assert bytes(writer.output) == b"still here\n"


async def test_resumable_client_close_stdin_across_a_cut(gateway: GatewayUnderTest) -> None:
    """ResumableSession: input, a cut, more input and the EOF while reconnecting: exactly once."""
    async with open_cut_proxy("127.0.0.1", gateway.port) as proxy:
        api = ApiClient(parse_server(f"http://127.0.0.1:{proxy.port}"), gateway.admin_token)
        created = await gateway.create(["cat"], tty=False)
        got = bytearray()
        seen = trio.Event()
        connected = trio.Event()
        statuses: list[str] = []

        async def on_output(chunk: OutputChunk) -> None:
            got.extend(chunk.data)
            if got.endswith(b"first\n"):
                seen.set()

        async def on_status(status: LinkStatus) -> None:
            statuses.append(status.state)
            connected.set()

        session = ResumableSession(
            lambda offset, mode, token: api.attach_url(created["id"], offset=offset, mode=mode,
                                                       resume_token=token),
            headers=api.auth_headers(), resume_token=created["resume_token"],
            on_output=on_output, on_status=on_status, backoff=Backoff(0.01, 0.05))
        end: list[SessionEnd] = []
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    end.append(await session.run())

                nursery.start_soon(run)
                await connected.wait()
                await session.send_stdin(b"first\n")
                await seen.wait()
                assert proxy.cut_all() == 1
                await session.send_stdin(b"second\n")
                session.close_stdin_nowait()
                session.close_stdin_nowait()  # idempotent
                with pytest.raises(LocalProtocolError, match="stdin was closed"):
                    await session.send_stdin(b"too late\n")
        assert end and end[0].code == 0 and end[0].reason == "exited", end
        assert bytes(got) == b"first\nsecond\n"
        assert "reconnected" in statuses
        assert session.statistics().connects >= 2

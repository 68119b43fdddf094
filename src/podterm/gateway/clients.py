"""The gateway's clients by address: PROXY header intake, the per-address budget, metrics.

Who a connection's client is comes from :mod:`podterm.net.clientaddr`
(socket peer, PROXY header, trusted forwarding headers); this module is what
the gateway does with it:

* :func:`receive_proxy_header` reads the PROXY header a ``--proxy-protocol``
  listener requires, before any HTTP or TLS byte, under a deadline.  A
  connection without a valid header is refused (``400`` on a plain-HTTP
  listener, best effort: a TLS client would not understand it) and counted.
* :class:`ClientConnections` counts live connections per client address
  (``max_connections_per_ip`` is keyed on the *client*, so everyone behind a
  balancer does not share one budget), how addresses were learnt (``via``)
  and the refusals, and renders them for ``/metrics`` with a bounded label
  set: the top :data:`TOP_ADDRESSES` addresses only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from podterm.errors import ProtocolViolation
from podterm.gateway.http import error_response, raw_response, send_and_close
from podterm.metrics import MetricFamily, counter, gauge, labelled
from podterm.net.clientaddr import receive_proxy_header as _receive
from podterm.protocol.proxy_header import ProxyResult

__all__ = ["ClientConnections", "ClientStatistics", "TOP_ADDRESSES", "receive_proxy_header"]

log = logging.getLogger(__name__)

#: Client addresses shown in ``podterm_client_connections{client_ip=...}``:
#: the busiest ten.  Prometheus labels must come from a bounded set; one per
#: address would grow without end behind a public load balancer.
TOP_ADDRESSES = 10

@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A frozen snapshot of :class:`ClientConnections` (see there)."""

    live: dict[str, int]
    connections_by_via: dict[str, int]
    requests_by_via: dict[str, int]
    refused_per_ip: int
    proxy_rejects: dict[str, int]


class ClientConnections:
    """Live connections per client address, and counters by how the address was learnt.

    Args:
        max_per_ip: connections one client address may hold at once; 0 = no bound.
    """

    __slots__ = ("max_per_ip", "_live", "_connections_by_via", "_requests_by_via",
                 "_refused_per_ip", "_proxy_rejects")

    def __init__(self, max_per_ip: int) -> None:
        self.max_per_ip = max_per_ip
        self._live: dict[str, int] = {}
        self._connections_by_via: dict[str, int] = {}
        self._requests_by_via: dict[str, int] = {}
        self._refused_per_ip = 0
        self._proxy_rejects: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<ClientConnections addresses={len(self._live)} max_per_ip={self.max_per_ip}>"

    def acquire(self, ip: str, via: str) -> bool:
        """Count a connection from ``ip``; False (and counted) when ``ip`` holds its budget."""
        held = self._live.get(ip, 0)
        if self.max_per_ip and held >= self.max_per_ip:
            self._refused_per_ip += 1
            return False
        self._live[ip] = held + 1
        self._connections_by_via[via] = self._connections_by_via.get(via, 0) + 1
        return True

    def release(self, ip: str) -> None:
        """The connection from ``ip`` that :meth:`acquire` counted has ended."""
        left = self._live.get(ip, 0) - 1
        if left > 0:
            self._live[ip] = left
        else:
            self._live.pop(ip, None)

    def held(self, ip: str) -> int:
        """Live connections from ``ip``."""
        return self._live.get(ip, 0)

    def count_request(self, via: str) -> None:
        """One HTTP request whose client address came from ``via``."""
        self._requests_by_via[via] = self._requests_by_via.get(via, 0) + 1

    def count_proxy_reject(self, reason: str) -> None:
        """A connection refused at its PROXY header (``invalid``, ``timeout``, ``closed``)."""
        self._proxy_rejects[reason] = self._proxy_rejects.get(reason, 0) + 1

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(live=dict(self._live),
                                connections_by_via=dict(self._connections_by_via),
                                requests_by_via=dict(self._requests_by_via),
                                refused_per_ip=self._refused_per_ip,
                                proxy_rejects=dict(self._proxy_rejects))

    def metric_families(self) -> list[MetricFamily]:
        """``/metrics`` families; at most :data:`TOP_ADDRESSES` address labels."""
        st = self.statistics()
        top = sorted(st.live.items(), key=lambda item: (-item[1], item[0]))[:TOP_ADDRESSES]
        return [
            labelled("podterm_client_connections", "gauge",
                     f"Live connections of the {TOP_ADDRESSES} busiest client addresses.",
                     "client_ip", dict(top)),
            gauge("podterm_client_addresses", "Distinct client addresses with live connections.",
                  len(st.live)),
            labelled("podterm_client_connections_total", "counter",
                     "Connections accepted, by where the client address came from.", "via",
                     st.connections_by_via),
            labelled("podterm_client_requests_total", "counter",
                     "HTTP requests, by where the client address came from.", "via",
                     st.requests_by_via),
            counter("podterm_connections_refused_per_ip_total",
                    "Connections refused because their client address held "
                    "max-connections-per-ip.", st.refused_per_ip),
            labelled("podterm_proxy_header_rejects_total", "counter",
                     "Connections refused at the PROXY header, by reason.", "reason",
                     st.proxy_rejects),
        ]


async def receive_proxy_header(stream: trio.abc.HalfCloseableStream, *, timeout_s: float,
                               answer_http: bool, clients: ClientConnections, peer: str
                               ) -> tuple[ProxyResult, trio.abc.HalfCloseableStream] | None:
    """Read the PROXY header that starts ``stream`` within ``timeout_s``.

    Returns:
        The header and the stream to read HTTP (or TLS) from; None when the
        connection was refused: an invalid header (a client that speaks HTTP
        straight to the listener fails on its first byte), none within
        ``timeout_s``, or the peer closed.  Refusals are counted in
        ``clients``, answered ``400`` when ``answer_http`` (plain-HTTP
        listeners), and the stream is closed.
    """
    reason: str | None = None
    message = ""
    with trio.move_on_after(timeout_s) as scope:
        try:
            return await _receive(stream)
        except ProtocolViolation as exc:
            reason, message = "invalid", f"expected a PROXY protocol header: {exc.message}"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "closed"
    if scope.cancelled_caught:
        reason, message = "timeout", f"no PROXY protocol header within {timeout_s:g} s"
    assert reason is not None
    clients.count_proxy_reject(reason)
    log.info("gateway.proxy_header.rejected peer=%s reason=%s %s", peer, reason, message)
    if answer_http and message:
        await send_and_close(stream, raw_response(error_response(400, message)))
    else:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
    return None

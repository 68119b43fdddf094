"""trio adapters: the only code that owns sockets and streams."""

from podterm.net.wsconn import (
    ConnectionClosed,
    WebSocketStream,
    accept_on,
    client_handshake,
    connect,
    heartbeat,
    reject_on,
    server_handshake,
)

__all__ = [
    "ConnectionClosed",
    "WebSocketStream",
    "accept_on",
    "client_handshake",
    "connect",
    "heartbeat",
    "reject_on",
    "server_handshake",
]

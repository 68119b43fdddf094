"""``HOST:PORT`` text, IPv6 in brackets (``[::1]:7780``): one parser, one formatter."""

from __future__ import annotations


def split_host_port(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` into ``(host, port)``, brackets removed.

    The port is digits only; its range is the caller's to check.

    Raises:
        ValueError: no ``:PORT``, an empty host, a port that is not digits, or a
            bare IPv6 address (where would its port start?).
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"not HOST:PORT (IPv6 needs brackets): {text!r}")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """``host`` and ``port`` as ``HOST:PORT`` text (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

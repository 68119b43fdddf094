"""Upstreams: where shells run.  The interface is in :mod:`.base`; ``local`` runs them here."""

from .base import Context, ExitStatus, OutputChannel, StreamSpec, Upstream, UpstreamStream
from .local import LocalStream, LocalStreamStatistics, LocalUpstream, LocalUpstreamStatistics

__all__ = [
    "Context",
    "ExitStatus",
    "LocalStream",
    "LocalStreamStatistics",
    "LocalUpstream",
    "LocalUpstreamStatistics",
    "OutputChannel",
    "StreamSpec",
    "Upstream",
    "UpstreamStream",
]

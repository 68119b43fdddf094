"""The sidecar agent (``podterm agent``): shells in the pod, one tunnel to the gateway.

:class:`Agent` holds the streams and the tunnel bookkeeping; :mod:`.dialer`
connects and reconnects; :mod:`.streams` is what a stream keeps while the
gateway is away; :mod:`.echo` is the ``--echo`` load-test stream.  The
command's entry point is :func:`podterm.agent.main.main`.
"""

from .dialer import ConnectionOutcome, Dialer, DialerStatistics, Registration, TokenFile
from .echo import EchoStream
from .main import Agent, AgentOptions, AgentStatistics, run_agent
from .streams import AgentStream, AgentStreamStatistics, FailedStream, ProcessStream

__all__ = [
    "Agent",
    "AgentOptions",
    "AgentStatistics",
    "AgentStream",
    "AgentStreamStatistics",
    "ConnectionOutcome",
    "Dialer",
    "DialerStatistics",
    "EchoStream",
    "FailedStream",
    "ProcessStream",
    "Registration",
    "TokenFile",
    "run_agent",
]

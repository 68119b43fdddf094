"""The podterm client: REST calls, the resumable session protocol, the local terminal.

``podterm.client.commands`` holds the ``exec/attach/join/sessions/kill``
entry points that ``podterm.cli`` calls.
"""

from podterm.client.http import ApiClient, ServerUnreachable, make_ssl_context, parse_server
from podterm.client.resume import (
    LinkStatus,
    OutputChunk,
    ResumableSession,
    SessionEnd,
    SessionFailed,
    exit_status,
)

__all__ = [
    "ApiClient",
    "LinkStatus",
    "OutputChunk",
    "ResumableSession",
    "ServerUnreachable",
    "SessionEnd",
    "SessionFailed",
    "exit_status",
    "make_ssl_context",
    "parse_server",
]

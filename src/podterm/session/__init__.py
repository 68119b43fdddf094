"""Sessions: objects that outlive connections (ring, context, ...)."""

from .context import Osc7Tracker, merge_context, parse_osc7, restore_spec
from .ring import Gap, OutputRing, RingStatistics

__all__ = [
    "Gap",
    "Osc7Tracker",
    "OutputRing",
    "RingStatistics",
    "merge_context",
    "parse_osc7",
    "restore_spec",
]

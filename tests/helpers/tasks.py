"""What this trio run's tasks are doing: for tests of "no task while idle"."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import trio


def _frames() -> Iterator[tuple[trio.lowlevel.Task, list[tuple[str, FrameType]]]]:
    """Every task of the run with its await chain: (coroutine name, frame), outermost first."""
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        chain: list[tuple[str, FrameType]] = []
        coro: Any = task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                chain.append((frame.f_code.co_name, frame))
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        yield task, chain
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)


def _count(match: Callable[[str, FrameType], bool]) -> list[str]:
    found = []
    for _task, chain in _frames():
        for name, frame in chain:
            if match(name, frame):
                found.append(name)
                break
    return found


def tasks_of(obj: object) -> list[str]:
    """The tasks running a method of ``obj`` now: the name of the outermost such method each."""
    return _count(lambda _name, frame: frame.f_locals.get("self") is obj)


def tasks_in(function_name: str) -> int:
    """How many tasks are inside a coroutine named ``function_name`` now (parked or not)."""
    return len(_count(lambda name, _frame: name == function_name))

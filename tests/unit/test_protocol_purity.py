"""The sans-IO rule (STYLE.md §1): nothing under podterm.protocol does I/O or reads a clock.

Every module is parsed with ``ast`` (not imported), so the check also covers
modules no test imports, and cannot be fooled by an import inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import podterm.protocol

PROTOCOL_DIR = Path(podterm.protocol.__file__).parent
MODULES = sorted(PROTOCOL_DIR.rglob("*.py"))
#: Top-level packages a protocol module must not import (time and I/O are arguments).
FORBIDDEN_IMPORTS = frozenset({"trio", "socket", "time"})


def _violations(tree: ast.AST) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_IMPORTS:
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            root = node.module.split(".")[0]
            if root in FORBIDDEN_IMPORTS:
                found.append(f"line {node.lineno}: from {node.module} import ...")
            if root == "os" and any(a.name == "urandom" for a in node.names):
                found.append(f"line {node.lineno}: from os import urandom")
        elif isinstance(node, ast.Attribute) and node.attr == "urandom":
            found.append(f"line {node.lineno}: os.urandom")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id == "__import__":
            found.append(f"line {node.lineno}: __import__()")
    return found


def test_there_are_modules_to_check() -> None:
    names = {p.name for p in MODULES}
    assert {"events.py", "k8s_channel.py", "session_proto.py", "offsets.py", "tunnel.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PROTOCOL_DIR)))
def test_module_is_sans_io(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert _violations(tree) == [], f"{path.name} breaks the sans-IO rule"


@pytest.mark.parametrize("source", [
    "import trio", "import trio.lowlevel", "from trio import sleep", "import socket as s",
    "import time", "from time import monotonic", "import os\nos.urandom(4)",
    "from os import urandom", "def f():\n    import time\n", "__import__('socket')",
])
def test_checker_catches(source: str) -> None:
    assert _violations(ast.parse(source))


@pytest.mark.parametrize("source", ["import os\nos.environ.get('X')", "import timeit",
                                    "from podterm.protocol import events", "import json"])
def test_checker_allows(source: str) -> None:
    assert _violations(ast.parse(source)) == []

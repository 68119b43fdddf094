"""The one place that chooses between the native codec and its pure-Python twin.

Everything on the data plane imports the codec from here::

    from podterm.protocol.codec import FrameReader, encode_frame, encode_message

Selection, decided once at import:

* ``PODTERM_CODEC=python`` forces the pure-Python twin (for debugging, and to
  compare the two in benchmarks);
* otherwise the compiled ``podterm._native`` modules are used when importable;
* ``PODTERM_NATIVE=require`` turns a missing extension into an ImportError
  instead of a silent fallback (CI sets it, so a broken build cannot pass).

``IMPL`` is ``"native"`` or ``"python"`` and ``REASON`` says why, in words a
person reads in ``podterm doctor``.  :func:`load` returns either implementation
by name, for tests that hold the two to identical behaviour.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace
from typing import Any

# The names each implementation provides, module by module.
_API: dict[str, tuple[str, ...]] = {
    "frame": ("FrameReader", "encode_frame", "encode_message"),
    "mask": ("mask",),
    "utf8": ("Utf8Validator", "validate_utf8"),
}


def load(impl: str) -> SimpleNamespace:
    """Return the codec API of ``impl`` (``"native"`` or ``"python"``) as a namespace.

    Raises:
        ImportError: ``impl`` is ``"native"`` and the extension is not built.
        ValueError: unknown ``impl``.
    """
    if impl not in ("native", "python"):
        raise ValueError(f"unknown codec implementation {impl!r}")
    package = "podterm._native" if impl == "native" else "podterm.protocol"
    ns: dict[str, Any] = {"IMPL": impl}
    for module_name, names in _API.items():
        module = importlib.import_module(f"{package}.{module_name}")
        for name in names:
            ns[name] = getattr(module, name)
    return SimpleNamespace(**ns)


def _choose() -> tuple[SimpleNamespace, str]:
    forced = os.environ.get("PODTERM_CODEC", "").lower()
    require = os.environ.get("PODTERM_NATIVE", "").lower() == "require"
    if forced == "python":
        if require:
            raise ImportError("PODTERM_CODEC=python contradicts PODTERM_NATIVE=require")
        return load("python"), "forced by PODTERM_CODEC=python"
    if forced not in ("", "native", "auto"):
        raise ImportError(f"PODTERM_CODEC={forced!r}: expected native, python or auto")
    try:
        return load("native"), "compiled extension podterm._native imported"
    except ImportError as exc:
        if require or forced == "native":
            raise
        return load("python"), f"native extension not available ({exc}); pure-Python twin in use"


_selected, REASON = _choose()
IMPL: str = _selected.IMPL
FrameReader = _selected.FrameReader
encode_frame = _selected.encode_frame
encode_message = _selected.encode_message
mask = _selected.mask
Utf8Validator = _selected.Utf8Validator
validate_utf8 = _selected.validate_utf8

__all__ = ["IMPL", "REASON", "load", "FrameReader", "encode_frame", "encode_message", "mask",
           "Utf8Validator", "validate_utf8"]

"""Extension list only; metadata lives in pyproject.toml.

Every ``native/X.pyx`` becomes ``podterm._native.X``.  The extensions are
optional: if Cython or a C compiler is missing the install still succeeds and
podterm runs on the pure-Python twins in ``podterm.protocol``.  Set
``PODTERM_NATIVE=require`` (CI does) to make a failed build an error instead.
Set ``PODTERM_ANNOTATE=1`` to write Cython's HTML annotation next to each .pyx.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

REQUIRE = os.environ.get("PODTERM_NATIVE", "").lower() == "require"


def _extensions() -> list:
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE:
            raise
        print("podterm: Cython not available; installing the pure-Python codec", file=sys.stderr)
        return []
    from setuptools import Extension

    exts = [
        Extension(
            "podterm._native." + os.path.splitext(os.path.basename(path))[0],
            [path],
            extra_compile_args=["-O3"],
        )
        for path in sorted(glob.glob("native/*.pyx"))
    ]
    return cythonize(
        exts,
        language_level=3,
        annotate=os.environ.get("PODTERM_ANNOTATE") == "1",
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    )


class OptionalBuildExt(build_ext):
    """Build the codec if we can; fall back to pure Python unless required."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            if REQUIRE:
                raise
            print(f"podterm: native codec not built ({exc}); using pure Python", file=sys.stderr)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            if REQUIRE:
                raise
            print(f"podterm: {ext.name} not built ({exc}); using pure Python", file=sys.stderr)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})

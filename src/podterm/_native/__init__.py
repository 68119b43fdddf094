"""Compiled twins of ``podterm.protocol``'s hot modules (built from ``native/``).

Import through :mod:`podterm.protocol.codec`, never directly: that module is the
one place that decides between native and pure Python, and says why.
"""

"""Incremental, fail-fast UTF-8 validation (native twin of ``podterm.protocol.utf8``).

The DFA itself is in ``utf8.pxd`` (inlined into ``frame.pyx`` as well); this
module gives Python callers the twin's ``Utf8Validator`` and ``validate_utf8``.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint8_t

from utf8 cimport UTF8_ACCEPT, UTF8_REJECT, utf8_feed


@cython.final
@cython.auto_pickle(False)
cdef class Utf8Validator:
    """Validates a byte stream given in pieces.

    ``feed`` returns False at the first invalid byte (and from then on);
    ``is_complete`` tells whether the stream so far ends on a character
    boundary (a text message must, when its last fragment arrives).
    """

    cdef int _state

    def __init__(self):
        self._state = UTF8_ACCEPT

    def reset(self):
        """Forget everything fed so far."""
        self._state = UTF8_ACCEPT

    def feed(self, data):
        """Feed more bytes; return False if the stream is now known to be invalid."""
        if self._state == UTF8_REJECT:
            return False
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        self._state = utf8_feed(self._state, <const uint8_t*>view.buf, view.len)
        PyBuffer_Release(&view)
        return self._state != UTF8_REJECT

    def is_complete(self):
        """True if no error so far and the stream ends on a character boundary."""
        return self._state == UTF8_ACCEPT


def validate_utf8(data):
    """True if ``data`` is, as a whole, valid UTF-8."""
    cdef Py_buffer view
    cdef int state
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    state = utf8_feed(UTF8_ACCEPT, <const uint8_t*>view.buf, view.len)
    PyBuffer_Release(&view)
    return state == UTF8_ACCEPT

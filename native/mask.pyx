"""RFC 6455 §5.3 masking, eight bytes at a time (native twin of ``podterm.protocol.mask``).

The C routine lives in ``mask.pxd`` so ``frame.pyx`` inlines it; this module
only wraps it for Python callers with the twin's exact signature and errors.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t

from mask cimport mask_copy


def mask(data, key, offset=0):
    """Return ``data`` XOR-ed with ``key`` repeated, starting at key byte ``offset % 4``.

    Masking and unmasking are the same operation.  ``offset`` lets a caller
    unmask a frame's payload in pieces: pass how many payload bytes came before.

    Raises:
        ValueError: ``key`` is not exactly 4 bytes.
    """
    if len(key) != 4:
        raise ValueError("mask key must be 4 bytes")
    cdef Py_buffer view
    cdef bytes out
    cdef bytes kbytes
    cdef Py_ssize_t o
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len == 0:
            return b""
        o = offset & 3
        kbytes = key if type(key) is bytes else bytes(key)
        out = PyBytes_FromStringAndSize(NULL, view.len)
        mask_copy(<uint8_t*>PyBytes_AS_STRING(out), <const uint8_t*>view.buf, view.len,
                  <const uint8_t*>PyBytes_AS_STRING(kbytes), o)
        return out
    finally:
        PyBuffer_Release(&view)

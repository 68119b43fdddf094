# C-level API of ``podterm._native.mask``: RFC 6455 §5.3 XOR masking.
#
# Everything here is ``inline`` so that a sibling module (``frame.pyx``) that
# writes ``from mask cimport mask_copy`` compiles its own copy: no runtime
# import, no function-pointer call per frame.  Keep this file free of cdef
# classes and non-inline functions, or Cython would try to import a module
# named plain ``mask`` at run time.

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy


cdef inline void mask_copy(uint8_t* dst, const uint8_t* src, Py_ssize_t n,
                           const uint8_t* key, Py_ssize_t offset) noexcept nogil:
    """Write ``src[i] ^ key[(offset + i) % 4]`` to ``dst[i]`` for ``i < n``.

    ``dst == src`` (in place) is allowed; partial overlap is not.  The key is
    widened to eight bytes once (byte order taken from memory, so this is
    endian-neutral) and the body runs eight bytes per step; gcc -O3 turns the
    word loop into 16/32-byte vector code.
    """
    cdef uint8_t kb[8]
    cdef uint64_t k64, w
    cdef Py_ssize_t i, words = n >> 3
    cdef Py_ssize_t o = offset & 3
    if n < 8:
        # Tiny payloads (keystrokes, pings): widening the key costs more than it saves.
        for i in range(n):
            dst[i] = src[i] ^ key[(o + i) & 3]
        return
    for i in range(8):
        kb[i] = key[(o + i) & 3]
    memcpy(&k64, kb, 8)
    for i in range(words):
        memcpy(&w, src + 8 * i, 8)
        w ^= k64
        memcpy(dst + 8 * i, &w, 8)
    for i in range(words << 3, n):
        dst[i] = src[i] ^ kb[i & 7]

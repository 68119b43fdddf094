# C-level API of ``podterm._native.utf8``: a fail-fast UTF-8 DFA.
#
# Inline only (see mask.pxd for why).  The states encode "what may come next",
# straight from Unicode 15 §3.9 table 3-7 (well-formed byte sequences):
#
#   ACCEPT      on a character boundary
#   CONT1..3    1..3 continuation bytes (80..BF) still expected
#   E0          after E0: next must be A0..BF (no overlongs), then 1 more
#   ED          after ED: next must be 80..9F (no surrogates), then 1 more
#   F0          after F0: next must be 90..BF (no overlongs), then 2 more
#   F4          after F4: next must be 80..8F (nothing above U+10FFFF), then 2 more
#   REJECT      sticky: the first byte that no valid text could continue with
#
# Rejecting at the *first* impossible byte is the contract of the pure-Python
# twin (``podterm.protocol.utf8``) and of RFC 6455 §8.1 "fail fast".

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    UTF8_ACCEPT = 0
    UTF8_CONT1 = 1
    UTF8_CONT2 = 2
    UTF8_CONT3 = 3
    UTF8_E0 = 4
    UTF8_ED = 5
    UTF8_F0 = 6
    UTF8_F4 = 7
    UTF8_REJECT = 8


cdef inline int utf8_step(int state, uint8_t b) noexcept nogil:
    """One DFA transition."""
    if state == UTF8_ACCEPT:
        if b < 0x80:
            return UTF8_ACCEPT
        if b < 0xC2:  # 80..BF stray continuation, C0/C1 overlong lead
            return UTF8_REJECT
        if b < 0xE0:
            return UTF8_CONT1
        if b == 0xE0:
            return UTF8_E0
        if b == 0xED:
            return UTF8_ED
        if b < 0xF0:
            return UTF8_CONT2
        if b == 0xF0:
            return UTF8_F0
        if b < 0xF4:
            return UTF8_CONT3
        if b == 0xF4:
            return UTF8_F4
        return UTF8_REJECT  # F5..FF never appear in UTF-8
    if state <= UTF8_CONT3:
        return state - 1 if 0x80 <= b <= 0xBF else UTF8_REJECT
    if state == UTF8_E0:
        return UTF8_CONT1 if 0xA0 <= b <= 0xBF else UTF8_REJECT
    if state == UTF8_ED:
        return UTF8_CONT1 if 0x80 <= b <= 0x9F else UTF8_REJECT
    if state == UTF8_F0:
        return UTF8_CONT2 if 0x90 <= b <= 0xBF else UTF8_REJECT
    if state == UTF8_F4:
        return UTF8_CONT2 if 0x80 <= b <= 0x8F else UTF8_REJECT
    return UTF8_REJECT


cdef inline int utf8_feed(int state, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Run the DFA over ``p[:n]`` from ``state``; return the new state.

    Stops at the first rejected byte.  ASCII runs are skipped eight bytes at a
    time while on a character boundary (terminal traffic is mostly ASCII).
    """
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    while i < n:
        if state == UTF8_ACCEPT:
            while i + 8 <= n:
                memcpy(&w, p + i, 8)
                if w & <uint64_t>0x8080808080808080ULL:
                    break
                i += 8
            while i < n and p[i] < 0x80:
                i += 1
            if i >= n:
                break
        state = utf8_step(state, p[i])
        if state == UTF8_REJECT:
            return UTF8_REJECT
        i += 1
    return state

"""RFC 6455 frame reader and writer over raw buffers (native twin of ``podterm.protocol.frame``).

The contract (events, errors, the order of checks, ``buffered``) is the
docstring of :mod:`podterm.protocol.frame`; this module must behave
identically for every input however it is split, and
``tests/unit/test_codec_equivalence.py`` holds it to that.  Error messages,
opcodes, limits and the close-payload helpers are imported from the twin, so
there is one source of truth for every string and number.

How it is fast
--------------
* ``feed`` walks the caller's buffer through a raw pointer; nothing is copied
  before it is needed.
* A frame whose header and payload are both inside the chunk (the common case)
  takes the fast path: the header is read in place, the payload is unmasked
  straight from the input into the new ``bytes`` object that is the event
  payload (one pass over the data), the ``(opcode, payload)`` tuple is built
  and appended.  No Python-level call happens per frame.
* Unmasking runs eight bytes per step (``mask.pxd``) and UTF-8 validation
  skips ASCII eight bytes per step (``utf8.pxd``); both are inlined here.
* Per small frame the cost is the two objects the caller receives; the event
  tuple is untracked by the cycle collector at birth (an int and a bytes can
  form no cycle) and a 1-byte payload is CPython's shared 1-byte bytes object.
* Only a header split across chunks is copied (at most 14 bytes).  A payload
  split across chunks, or a fragmented message, is unmasked into one growing
  ``bytes`` object that becomes the event payload itself.  It grows by
  doubling (from 256 bytes) as bytes arrive and never past the lengths the
  peer declared, so memory follows bytes received, not lengths announced, and
  a message that ends exactly at its capacity is handed over without a copy.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

from mask cimport mask_copy
from utf8 cimport UTF8_ACCEPT, UTF8_REJECT, utf8_feed

from podterm.errors import CloseCode, ProtocolViolation
from podterm.protocol.frame import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    E_CLOSE_1,
    E_CLOSE_CODE,
    E_CLOSE_UTF8,
    E_CONTROL_LONG,
    E_EXPECTED_CONT,
    E_FRAG_CONTROL,
    E_FRAME_BIG,
    E_LEN_MSB,
    E_MASKED,
    E_MESSAGE_BIG,
    E_OPCODE,
    E_RSV,
    E_TEXT_UTF8,
    E_UNEXPECTED_CONT,
    E_UNMASKED,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    encode_close_payload,
    is_valid_close_code,
    parse_close_payload,
)

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)
    # Resizes a bytes object nobody else references yet (refcount 1), in place
    # when the allocator can; on failure frees it, sets *obj to NULL, raises.
    int _PyBytes_Resize(PyObject** obj, Py_ssize_t newsize) except -1

__all__ = [
    "FrameReader", "encode_frame", "encode_message",
    "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
    "DEFAULT_MAX_FRAME_BYTES", "DEFAULT_MAX_MESSAGE_BYTES", "MAX_CONTROL_PAYLOAD",
    "is_valid_close_code", "parse_close_payload", "encode_close_payload",
]

cdef enum:
    C_OP_CONT = 0
    C_OP_TEXT = 1
    C_OP_BINARY = 2
    C_OP_CLOSE = 8
    C_OP_PING = 9
    C_OP_PONG = 10
    # bit i set <=> opcode i is defined by RFC 6455 §5.2
    KNOWN_OPCODES = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 8) | (1 << 9) | (1 << 10)
    C_MAX_CONTROL = 125

# Violations, numbered in the order the twin's docstring lists its checks.
cdef enum:
    OK = 0
    ERR_RSV = 1
    ERR_OPCODE = 2
    ERR_FRAG_CONTROL = 3
    ERR_UNEXPECTED_CONT = 4
    ERR_EXPECTED_CONT = 5
    ERR_UNMASKED = 6
    ERR_MASKED = 7
    ERR_CONTROL_LONG = 8
    ERR_LEN_MSB = 9
    ERR_FRAME_BIG = 10
    ERR_MESSAGE_BIG = 11
    ERR_CLOSE_1 = 12
    ERR_TEXT_UTF8 = 13
    ERR_CLOSE_CODE = 14
    ERR_CLOSE_UTF8 = 15

cdef object _PROTOCOL_ERROR = CloseCode.PROTOCOL_ERROR
cdef object _INVALID_PAYLOAD = CloseCode.INVALID_PAYLOAD
cdef object _MESSAGE_TOO_BIG = CloseCode.MESSAGE_TOO_BIG
cdef frozenset _KNOWN_OPCODE_SET = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
cdef bytes _EMPTY = b""
# Largest limit we need to tell apart: a frame length is below 2**63 (check 8).
cdef long long _LIMIT_CAP = 0x7FFFFFFFFFFFFFFF


cdef tuple _describe(int err, int opcode):
    """(message, close code) of a violation, as the twin words it."""
    if err == ERR_RSV:
        return E_RSV, _PROTOCOL_ERROR
    if err == ERR_OPCODE:
        return E_OPCODE.format(opcode), _PROTOCOL_ERROR
    if err == ERR_FRAG_CONTROL:
        return E_FRAG_CONTROL, _PROTOCOL_ERROR
    if err == ERR_UNEXPECTED_CONT:
        return E_UNEXPECTED_CONT, _PROTOCOL_ERROR
    if err == ERR_EXPECTED_CONT:
        return E_EXPECTED_CONT, _PROTOCOL_ERROR
    if err == ERR_UNMASKED:
        return E_UNMASKED, _PROTOCOL_ERROR
    if err == ERR_MASKED:
        return E_MASKED, _PROTOCOL_ERROR
    if err == ERR_CONTROL_LONG:
        return E_CONTROL_LONG, _PROTOCOL_ERROR
    if err == ERR_LEN_MSB:
        return E_LEN_MSB, _PROTOCOL_ERROR
    if err == ERR_FRAME_BIG:
        return E_FRAME_BIG, _MESSAGE_TOO_BIG
    if err == ERR_MESSAGE_BIG:
        return E_MESSAGE_BIG, _MESSAGE_TOO_BIG
    if err == ERR_CLOSE_1:
        return E_CLOSE_1, _PROTOCOL_ERROR
    if err == ERR_TEXT_UTF8:
        return E_TEXT_UTF8, _INVALID_PAYLOAD
    if err == ERR_CLOSE_CODE:
        return E_CLOSE_CODE, _PROTOCOL_ERROR
    return E_CLOSE_UTF8, _INVALID_PAYLOAD


cdef inline bint _close_code_ok(int code) noexcept nogil:
    # Same ranges as the twin's is_valid_close_code (RFC 6455 §7.4 + IANA).
    return (1000 <= code <= 1003) or (1007 <= code <= 1014) or (3000 <= code <= 4999)


cdef inline Py_ssize_t _header_len(uint8_t b1) noexcept nogil:
    """Header size announced by the second byte: 2, +2 or +8 for the length, +4 for the key."""
    cdef uint8_t len7 = b1 & 0x7F
    cdef Py_ssize_t hlen = 2
    if len7 == 126:
        hlen = 4
    elif len7 == 127:
        hlen = 10
    if b1 & 0x80:
        hlen += 4
    return hlen


cdef inline bint _over(uint64_t value, long long limit) noexcept nogil:
    """``value > limit`` for a limit that may be negative (set by a caller)."""
    return limit < 0 or value > <uint64_t>limit


cdef inline long long _clamp_limit(object value) except? -2:
    # Python ints are unbounded; anything at or above 2**63 behaves the same
    # as 2**63 - 1 because no frame can be that long.
    if value >= _LIMIT_CAP:
        return _LIMIT_CAP
    if value < 0:
        return -1
    return int(value)  # a float limit x behaves as floor(x): lengths are integers


cdef inline int _emit(list out, int opcode, bytes payload) except -1:
    """Append the event ``(opcode, payload)`` to ``out``."""
    cdef object op = opcode  # a cached small int
    cdef tuple event = PyTuple_New(2)
    Py_INCREF(op)
    PyTuple_SET_ITEM(event, 0, op)
    Py_INCREF(payload)
    PyTuple_SET_ITEM(event, 1, payload)
    # An int and a bytes can never be part of a reference cycle, so the
    # collector need not track the tuple (CPython itself untracks such tuples,
    # but only when a collection visits them).  On a feed of tens of
    # thousands of 2-16 byte frames this saved 15-23% of the time (measured).
    PyObject_GC_UnTrack(<void*>event)
    out.append(event)
    return 0


@cython.final
@cython.auto_pickle(False)
cdef class FrameReader:
    """Incremental RFC 6455 frame parser; see :mod:`podterm.protocol.frame` for the contract."""

    cdef public bint is_server
    cdef object _max_frame_obj
    cdef object _max_message_obj
    cdef long long _max_frame
    cdef long long _max_message

    # Header bytes held across feeds (a header is at most 2 + 8 + 4 bytes).
    cdef uint8_t _hdr[14]
    cdef Py_ssize_t _hdr_len

    # The frame whose header has been parsed and whose payload is pending.
    cdef bint _in_frame
    cdef int _opcode
    cdef bint _fin
    cdef bint _masked
    cdef uint8_t _key[4]
    cdef uint64_t _remaining  # payload bytes still to come
    cdef uint64_t _done  # payload bytes already consumed (the mask offset)

    # The data message in progress.
    cdef int _msg_opcode  # 0 = none
    cdef uint64_t _msg_len  # sum of the declared lengths of its frames so far
    cdef PyObject* _msg  # bytes object being filled (refcount 1, private), or NULL
    cdef Py_ssize_t _msg_size  # bytes written into _msg
    cdef Py_ssize_t _msg_cap  # len(_msg)
    cdef int _utf8  # DFA state over the text message so far

    # The control frame in progress (at most 125 bytes, never fragmented).
    cdef uint8_t _ctl[125]
    cdef Py_ssize_t _ctl_size

    cdef object _error  # the ProtocolViolation that killed this reader, or None

    def __cinit__(self):
        self._msg = NULL

    def __init__(self, *, is_server, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
                 max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES):
        if max_frame_bytes < MAX_CONTROL_PAYLOAD or max_message_bytes < MAX_CONTROL_PAYLOAD:
            raise ValueError("limits must be at least 125 bytes")
        self.is_server = is_server
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes
        self._hdr_len = 0
        self._in_frame = False
        self._opcode = 0
        self._fin = False
        self._masked = False
        self._remaining = 0
        self._done = 0
        self._msg_opcode = 0
        self._msg_len = 0
        Py_XDECREF(self._msg)
        self._msg = NULL
        self._msg_size = 0
        self._msg_cap = 0
        self._utf8 = UTF8_ACCEPT
        self._ctl_size = 0
        self._error = None

    def __dealloc__(self):
        Py_XDECREF(self._msg)
        self._msg = NULL

    @property
    def max_frame_bytes(self):
        """Largest frame payload accepted (close 1009 above it)."""
        return self._max_frame_obj

    @max_frame_bytes.setter
    def max_frame_bytes(self, value):
        self._max_frame = _clamp_limit(value)
        self._max_frame_obj = value

    @property
    def max_message_bytes(self):
        """Largest data message accepted, all fragments together (close 1009 above it)."""
        return self._max_message_obj

    @max_message_bytes.setter
    def max_message_bytes(self, value):
        self._max_message = _clamp_limit(value)
        self._max_message_obj = value

    @property
    def buffered(self):
        """Bytes held: partial header plus partial message and control frame."""
        return self._hdr_len + self._msg_size + self._ctl_size

    def feed(self, data):
        """Consume ``data``; return every message completed, in order.

        Raises:
            ProtocolViolation: the peer broke RFC 6455 (see the twin's module docstring).
        """
        if self._error is not None:
            raise ProtocolViolation(self._error.message, self._error.close_code)
        cdef list out = []
        cdef Py_buffer view
        if type(data) is bytes:
            self._parse(<const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), out)
            return out
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._parse(<const uint8_t*>view.buf, view.len, out)
        finally:
            PyBuffer_Release(&view)
        return out

    # -- errors ---------------------------------------------------------------

    cdef int _fail(self, int err, int opcode, list out) except -1:
        message, code = _describe(err, opcode)
        self._error = ProtocolViolation(message, code)
        raise ProtocolViolation(message, code, partial=out)

    # -- header ---------------------------------------------------------------

    cdef inline int _check_header(self, const uint8_t* h, Py_ssize_t have) noexcept:
        """Checks 1-8 that ``have`` (>= 1) header bytes allow, in contract order."""
        cdef uint8_t b0 = h[0]
        cdef int opcode = b0 & 0x0F
        cdef uint8_t b1
        if b0 & 0x70:
            return ERR_RSV
        if not (KNOWN_OPCODES >> opcode) & 1:
            return ERR_OPCODE
        if opcode >= C_OP_CLOSE:
            if not b0 & 0x80:
                return ERR_FRAG_CONTROL
        elif opcode == C_OP_CONT:
            if self._msg_opcode == 0:
                return ERR_UNEXPECTED_CONT
        elif self._msg_opcode != 0:
            return ERR_EXPECTED_CONT
        if have < 2:
            return OK
        b1 = h[1]
        if b1 & 0x80:
            if not self.is_server:
                return ERR_MASKED
        elif self.is_server:
            return ERR_UNMASKED
        if opcode >= C_OP_CLOSE and (b1 & 0x7F) > C_MAX_CONTROL:
            return ERR_CONTROL_LONG
        if have >= 3 and (b1 & 0x7F) == 127 and h[2] & 0x80:
            return ERR_LEN_MSB
        return OK

    cdef inline int _start_frame(self, const uint8_t* h) noexcept:
        """Checks 9-11 on a complete header, then enter the frame; returns an error or OK."""
        cdef uint8_t b0 = h[0]
        cdef uint8_t b1 = h[1]
        cdef uint8_t len7 = b1 & 0x7F
        cdef int opcode = b0 & 0x0F
        cdef uint64_t length
        cdef Py_ssize_t koff
        cdef int i
        if len7 < 126:
            length = len7
            koff = 2
        elif len7 == 126:
            length = (<uint64_t>h[2] << 8) | h[3]
            koff = 4
        else:
            length = 0
            for i in range(2, 10):
                length = (length << 8) | h[i]
            koff = 10
        if _over(length, self._max_frame):
            return ERR_FRAME_BIG
        if opcode < C_OP_CLOSE:
            # _msg_len <= max < 2**63 and length < 2**63: the sum cannot wrap.
            if _over(self._msg_len + length, self._max_message):
                return ERR_MESSAGE_BIG
            self._msg_len += length
        elif opcode == C_OP_CLOSE and length == 1:
            return ERR_CLOSE_1
        self._masked = (b1 & 0x80) != 0
        if self._masked:
            memcpy(self._key, h + koff, 4)
        self._opcode = opcode
        self._fin = (b0 & 0x80) != 0
        self._remaining = length
        self._done = 0
        self._in_frame = True
        if opcode != C_OP_CONT and opcode < C_OP_CLOSE:
            self._msg_opcode = opcode
            self._utf8 = UTF8_ACCEPT
        return OK

    cdef Py_ssize_t _collect_header(self, const uint8_t* p, Py_ssize_t pos, Py_ssize_t end,
                                    list out) except -1:
        """Accumulate a header split across feeds, exactly as the twin does; return the new pos."""
        cdef Py_ssize_t take, hlen
        cdef int err
        if self._hdr_len < 2:
            take = min(2 - self._hdr_len, end - pos)
            memcpy(self._hdr + self._hdr_len, p + pos, take)
            self._hdr_len += take
            pos += take
            if self._hdr_len == 0:
                return pos
            err = self._check_header(self._hdr, self._hdr_len)
            if err:
                return self._fail(err, self._hdr[0] & 0x0F, out)
            if self._hdr_len < 2:
                return pos
        hlen = _header_len(self._hdr[1])
        if self._hdr_len < hlen:
            take = min(hlen - self._hdr_len, end - pos)
            memcpy(self._hdr + self._hdr_len, p + pos, take)
            self._hdr_len += take
            pos += take
            err = self._check_header(self._hdr, self._hdr_len)
            if err:
                return self._fail(err, self._hdr[0] & 0x0F, out)
            if self._hdr_len < hlen:
                return pos
        err = self._start_frame(self._hdr)
        if err:
            return self._fail(err, self._hdr[0] & 0x0F, out)
        self._hdr_len = 0
        return pos

    # -- payload --------------------------------------------------------------

    cdef inline bytes _copy_payload(self, const uint8_t* src, Py_ssize_t n):
        """A new bytes object holding ``src[:n]`` unmasked (the frame starts at ``src``)."""
        cdef uint8_t one
        if n == 0:
            return _EMPTY
        if n == 1:
            # CPython keeps every 1-byte bytes object as a shared singleton.
            one = src[0] ^ self._key[0] if self._masked else src[0]
            return PyBytes_FromStringAndSize(<char*>&one, 1)
        cdef bytes payload = PyBytes_FromStringAndSize(NULL, n)
        cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(payload)
        if self._masked:
            mask_copy(dst, src, n, self._key, 0)
        else:
            memcpy(dst, src, n)
        return payload

    cdef int _check_close(self, bytes payload, list out) except -1:
        """Checks 13-14 on a complete, non-empty close payload (length >= 2 by check 11)."""
        cdef const uint8_t* b = <const uint8_t*>PyBytes_AS_STRING(payload)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        if not _close_code_ok((b[0] << 8) | b[1]):
            return self._fail(ERR_CLOSE_CODE, C_OP_CLOSE, out)
        if utf8_feed(UTF8_ACCEPT, b + 2, n - 2) != UTF8_ACCEPT:
            return self._fail(ERR_CLOSE_UTF8, C_OP_CLOSE, out)
        return 0

    cdef int _whole_frame(self, const uint8_t* src, Py_ssize_t n, list out) except -1:
        """The fast path: the entire payload of a just-started frame is at ``src``."""
        cdef int opcode = self._opcode
        cdef int state
        cdef bytes payload
        if opcode >= C_OP_CLOSE:
            payload = self._copy_payload(src, n)
            if opcode == C_OP_CLOSE and n:
                self._check_close(payload, out)
            _emit(out, opcode, payload)
            return 0
        if opcode != C_OP_CONT and self._fin:
            # A whole single-frame message: no message buffer at all.
            payload = self._copy_payload(src, n)
            if opcode == C_OP_TEXT:
                state = utf8_feed(UTF8_ACCEPT, <const uint8_t*>PyBytes_AS_STRING(payload), n)
                if state != UTF8_ACCEPT:
                    if state != UTF8_REJECT:
                        # The twin stored the (valid) piece before failing at
                        # FIN; keep ``buffered`` identical.
                        self._msg_size = n
                    return self._fail(ERR_TEXT_UTF8, opcode, out)
            _emit(out, opcode, payload)
            self._msg_opcode = 0
            self._msg_len = 0
            return 0
        self._piece(src, n, out)
        return self._end_frame(out)

    cdef int _msg_reserve(self, Py_ssize_t need) except -1:
        """Make room for ``need`` bytes in the message buffer, never past what was declared."""
        cdef Py_ssize_t cap
        cdef bytes fresh
        if need <= self._msg_cap:
            return 0
        cap = self._msg_cap * 2
        if cap < 256:
            cap = 256
        if <uint64_t>cap > self._msg_len:
            cap = <Py_ssize_t>self._msg_len
        if cap < need:
            cap = need
        if self._msg == NULL:
            fresh = PyBytes_FromStringAndSize(NULL, cap)
            Py_INCREF(fresh)
            self._msg = <PyObject*>fresh
        else:
            try:
                _PyBytes_Resize(&self._msg, cap)
            except MemoryError:
                self._msg = NULL
                self._msg_size = 0
                self._msg_cap = 0
                raise
        self._msg_cap = cap
        return 0

    cdef bytes _take_message(self):
        """Hand the finished message buffer over as the event payload."""
        cdef bytes payload
        if self._msg == NULL:
            return _EMPTY
        if self._msg_cap != self._msg_size:
            _PyBytes_Resize(&self._msg, self._msg_size)
        payload = <bytes>self._msg
        Py_DECREF(payload)  # drop the reader's reference; ``payload`` owns it now
        self._msg = NULL
        self._msg_size = 0
        self._msg_cap = 0
        return payload

    cdef int _piece(self, const uint8_t* src, Py_ssize_t take, list out) except -1:
        """Consume part (or all) of the current frame's payload into its buffer."""
        cdef uint8_t* dst
        cdef int state
        if self._opcode >= C_OP_CLOSE:
            dst = self._ctl + self._ctl_size
            if self._masked:
                mask_copy(dst, src, take, self._key, <Py_ssize_t>(self._done & 3))
            else:
                memcpy(dst, src, take)
            self._ctl_size += take
            return 0
        if take == 0:
            return 0
        self._msg_reserve(self._msg_size + take)
        dst = <uint8_t*>PyBytes_AS_STRING(<object>self._msg) + self._msg_size
        if self._masked:
            mask_copy(dst, src, take, self._key, <Py_ssize_t>(self._done & 3))
        else:
            memcpy(dst, src, take)
        if self._msg_opcode == C_OP_TEXT:
            state = utf8_feed(self._utf8, dst, take)
            self._utf8 = state
            if state == UTF8_REJECT:
                return self._fail(ERR_TEXT_UTF8, C_OP_TEXT, out)
        self._msg_size += take
        return 0

    cdef int _end_frame(self, list out) except -1:
        """The current frame's payload is complete: emit what it completes."""
        cdef bytes payload
        cdef int opcode = self._opcode
        if opcode >= C_OP_CLOSE:
            if self._ctl_size:
                payload = PyBytes_FromStringAndSize(<char*>self._ctl, self._ctl_size)
            else:
                payload = _EMPTY
            self._ctl_size = 0
            if opcode == C_OP_CLOSE and PyBytes_GET_SIZE(payload):
                self._check_close(payload, out)
            _emit(out, opcode, payload)
        elif self._fin:
            if self._msg_opcode == C_OP_TEXT and self._utf8 != UTF8_ACCEPT:
                return self._fail(ERR_TEXT_UTF8, C_OP_TEXT, out)
            payload = self._take_message()
            _emit(out, self._msg_opcode, payload)
            self._msg_opcode = 0
            self._msg_len = 0
        return 0

    # -- the loop -------------------------------------------------------------

    cdef int _parse(self, const uint8_t* p, Py_ssize_t end, list out) except -1:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t avail, hlen, take
        cdef const uint8_t* h
        cdef int err
        while True:
            if not self._in_frame:
                avail = end - pos
                if self._hdr_len == 0 and avail >= 2:
                    h = p + pos
                    hlen = _header_len(h[1])
                    if avail >= hlen:
                        # Whole header in the chunk: read it in place.
                        err = self._check_header(h, hlen)
                        if err == OK:
                            err = self._start_frame(h)
                        if err:
                            # What the twin would hold: it takes 2 bytes before
                            # checks 1-7 and the whole header before 8-11.
                            self._hdr_len = 2 if err < ERR_LEN_MSB else hlen
                            return self._fail(err, h[0] & 0x0F, out)
                        pos += hlen
                    else:
                        pos = self._collect_header(p, pos, end, out)
                else:
                    pos = self._collect_header(p, pos, end, out)
                if not self._in_frame:
                    return 0
            avail = end - pos
            if self._done == 0 and self._remaining <= <uint64_t>avail:
                take = <Py_ssize_t>self._remaining
                self._whole_frame(p + pos, take, out)
                pos += take
                self._remaining = 0
                self._in_frame = False
            else:
                take = avail if self._remaining > <uint64_t>avail else <Py_ssize_t>self._remaining
                if take:
                    self._piece(p + pos, take, out)
                    pos += take
                    self._remaining -= take
                    self._done += take
                if self._remaining:
                    return 0
                self._in_frame = False
                self._end_frame(out)
            if pos >= end:
                return 0


# -- writer -------------------------------------------------------------------

cdef inline Py_ssize_t _write_header(uint8_t* out, uint8_t b0, uint64_t n, bint masked) noexcept nogil:
    cdef uint8_t mbit = 0x80 if masked else 0
    cdef int i
    out[0] = b0
    if n < 126:
        out[1] = mbit | <uint8_t>n
        return 2
    if n < 0x10000:
        out[1] = mbit | 126
        out[2] = <uint8_t>(n >> 8)
        out[3] = <uint8_t>n
        return 4
    out[1] = mbit | 127
    for i in range(8):
        out[2 + i] = <uint8_t>(n >> (56 - 8 * i))
    return 10


cdef inline Py_ssize_t _header_size(uint64_t n) noexcept nogil:
    if n < 126:
        return 2
    if n < 0x10000:
        return 4
    return 10


cdef int _known_opcode(object opcode) except -1:
    """The opcode as a C int, or ValueError exactly as the twin raises it."""
    cdef int op
    if type(opcode) is int and 0 <= opcode <= 15:
        op = opcode
        if (KNOWN_OPCODES >> op) & 1:
            return op
    elif opcode in _KNOWN_OPCODE_SET:
        return opcode
    raise ValueError(f"unknown opcode {opcode}")


cdef bytes _key_bytes(object mask_key):
    if len(mask_key) != 4:
        raise ValueError("mask key must be 4 bytes")
    if type(mask_key) is bytes:
        return <bytes>mask_key
    return bytes(mask_key)


cdef inline bint _get_span(object obj, Py_buffer* view, const uint8_t** p,
                           Py_ssize_t* n) except -1:
    """Point ``p``/``n`` at ``obj``'s bytes; True if ``view`` must be released."""
    if type(obj) is bytes:
        p[0] = <const uint8_t*>PyBytes_AS_STRING(obj)
        n[0] = PyBytes_GET_SIZE(obj)
        return False
    PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    p[0] = <const uint8_t*>view.buf
    n[0] = view.len
    return True


def encode_frame(opcode, payload=b"", *, fin=True, mask_key=None):
    """Serialize one frame.

    Args:
        opcode: one of the ``OP_*`` constants.
        payload: the unmasked payload.
        fin: False for every fragment of a message but the last.
        mask_key: 4 bytes to mask with (client role), or None (server role).

    Raises:
        ValueError: unknown opcode, a control frame that is fragmented or longer
            than 125 bytes, or a mask key that is not 4 bytes.
    """
    cdef int op = _known_opcode(opcode)
    cdef Py_buffer view
    cdef const uint8_t* src
    cdef Py_ssize_t n, hlen
    cdef bint final = fin
    cdef bytes key = None
    cdef bytes frame
    cdef uint8_t* dst
    cdef bint release = _get_span(payload, &view, &src, &n)
    try:
        if op >= C_OP_CLOSE and (n > C_MAX_CONTROL or not final):
            raise ValueError("control frames must be final and at most 125 bytes")
        if mask_key is not None:
            key = _key_bytes(mask_key)
        hlen = _header_size(n)
        if key is None:
            frame = PyBytes_FromStringAndSize(NULL, hlen + n)
            dst = <uint8_t*>PyBytes_AS_STRING(frame)
            _write_header(dst, (0x80 if final else 0) | op, n, False)
            memcpy(dst + hlen, src, n)
        else:
            frame = PyBytes_FromStringAndSize(NULL, hlen + 4 + n)
            dst = <uint8_t*>PyBytes_AS_STRING(frame)
            _write_header(dst, (0x80 if final else 0) | op, n, True)
            memcpy(dst + hlen, PyBytes_AS_STRING(key), 4)
            mask_copy(dst + hlen + 4, src, n, <const uint8_t*>PyBytes_AS_STRING(key), 0)
        return frame
    finally:
        if release:
            PyBuffer_Release(&view)


def encode_message(prefix, payload, *, opcode=OP_BINARY, mask_key=None):
    """Serialize a single-frame data message whose payload is ``prefix + payload``."""
    cdef int op
    if type(opcode) is int and (opcode == 1 or opcode == 2):
        op = opcode
    elif opcode in (OP_TEXT, OP_BINARY):
        op = opcode
    else:
        raise ValueError("encode_message writes data messages only")
    cdef Py_buffer pview, view
    cdef const uint8_t* psrc
    cdef const uint8_t* src
    cdef Py_ssize_t pn, n, hlen, total
    cdef bytes key = None
    cdef bytes frame
    cdef uint8_t* dst
    cdef const uint8_t* k
    cdef bint prelease = _get_span(prefix, &pview, &psrc, &pn)
    cdef bint release = False
    try:
        release = _get_span(payload, &view, &src, &n)
        try:
            if mask_key is not None:
                key = _key_bytes(mask_key)
            total = pn + n
            hlen = _header_size(total)
            if key is None:
                frame = PyBytes_FromStringAndSize(NULL, hlen + total)
                dst = <uint8_t*>PyBytes_AS_STRING(frame)
                _write_header(dst, 0x80 | op, total, False)
                memcpy(dst + hlen, psrc, pn)
                memcpy(dst + hlen + pn, src, n)
            else:
                frame = PyBytes_FromStringAndSize(NULL, hlen + 4 + total)
                dst = <uint8_t*>PyBytes_AS_STRING(frame)
                k = <const uint8_t*>PyBytes_AS_STRING(key)
                _write_header(dst, 0x80 | op, total, True)
                memcpy(dst + hlen, k, 4)
                mask_copy(dst + hlen + 4, psrc, pn, k, 0)
                mask_copy(dst + hlen + 4 + pn, src, n, k, pn)
            return frame
        finally:
            if release:
                PyBuffer_Release(&view)
    finally:
        if prelease:
            PyBuffer_Release(&pview)

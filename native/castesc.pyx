"""asciicast lines off the GIL: JSON escaping of UTF-8 and the file write (twin: ``podterm.recording.castesc``).

``escape_json_utf8(data)`` returns the bytes ``json.dumps(data.decode(),
ensure_ascii=False)`` writes between its quotes (backslash and quote
escaped; C0 controls as ``\\b \\t \\n \\f \\r`` or ``\\u00xx``; DEL and every
byte of a multi-byte character as they are), or None when ``data`` is not
complete, valid UTF-8 (the caller then takes the incremental decoder).
``scan_many`` only judges chunks (valid UTF-8? how many bytes do the escapes
add?), and a :class:`LineBuffer` collects one file's lines (verbatim parts
and chunks to escape) and writes them, escaping into a reused :class:`Scratch`
buffer a slice at a time on the way.  The pure-Python twin is the
oracle; ``tests/unit/test_castesc_equivalence.py`` holds the two to the same
bytes.

Why native: the recording writer runs in a worker thread, and every byte it
handles while holding the GIL is time the event loop (the relay) waits for
it.  Here the work on the bytes runs inside ``with nogil:``, and per batch
of chunks, not per chunk: the writer releases the GIL once to judge every
chunk of a batch (``scan_many``) and once per file to escape and write
(``LineBuffer.write_to``), so the event loop waits for it back twice per
batch, whatever the number of chunks.  No ``bytes`` object is made for an
escaped chunk and no fresh memory is touched per batch (the scratch buffer
is reused).

How the bytes are handled: sixteen at a time with SSE2 (part of x86-64; a
byte loop elsewhere).  The scan validates UTF-8 with the DFA of ``utf8.pxd``
(strict as Python's decoder: no surrogates, no overlongs) and counts what
the escapes add; the fill copies runs that need no escape sixteen bytes per
store and writes each escape in place, never past the end it was given.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from utf8 cimport UTF8_ACCEPT, UTF8_REJECT, utf8_step

import os

cdef extern from "unistd.h" nogil:
    ssize_t c_write "write"(int fd, const void* buf, size_t count)

#: Chunks (or batches) at least this long are judged and escaped with the GIL
#: released (a PTY read is often under 100 bytes; a bulk read is 64 KiB).
NOGIL_MIN_BYTES = 2048
cdef Py_ssize_t _NOGIL_MIN = NOGIL_MIN_BYTES
#: ``write_to`` renders and writes this much at a time: small enough to be
#: still in the CPU cache when the kernel copies it (rendering a whole 4 MiB
#: batch first made the copy into the page cache read it back from memory, and
#: cost twice as much), large enough that the writes are few.
SLICE_BYTES = 256 * 1024
cdef Py_ssize_t _SLICE = SLICE_BYTES
#: A scratch buffer above this size is given back after each write: it grows
#: past a slice only for one part that escapes to more (a 256 KiB read of
#: control characters escapes to 1.5 MiB).
SCRATCH_KEEP_BYTES = 2 * 1024 * 1024
cdef Py_ssize_t _SCRATCH_KEEP = SCRATCH_KEEP_BYTES

# Bytes each ASCII byte's escape adds: 1 for \" \\ \b \t \n \f \r, 5 for
# \u00xx, 0 for the rest (and for every byte >= 0x80).
cdef uint8_t _EXTRA[256]
# The letter after the backslash of a two-byte escape, 0 for \u00xx.
cdef char _SHORT[128]

cdef int _c
for _c in range(256):
    _EXTRA[_c] = 0
for _c in range(128):
    _SHORT[_c] = 0
for _c in range(0x20):
    _EXTRA[_c] = 5
for _c, _letter in ((0x08, b"b"), (0x09, b"t"), (0x0A, b"n"), (0x0C, b"f"), (0x0D, b"r"),
                    (0x22, b'"'), (0x5C, b"\\")):
    _EXTRA[_c] = 1
    _SHORT[_c] = (<bytes>_letter)[0]

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Set bits of a 16-bit mask (no popcnt instruction is assumed). */
    static inline int podterm_popcount16(unsigned x) {
        x = x - ((x >> 1) & 0x5555u);
        x = (x & 0x3333u) + ((x >> 2) & 0x3333u);
        x = (x + (x >> 4)) & 0x0f0fu;
        return (int)((x + (x >> 8)) & 0x1fu);
    }
    #if defined(__SSE2__) && defined(__GNUC__)
    #include <emmintrin.h>
    #define PODTERM_SIMD 1
    /* Bytes <= 0x1f (unsigned: max(v, 0x1f) == 0x1f). */
    static inline __m128i podterm_ctl16(__m128i v) {
        __m128i low = _mm_set1_epi8(0x1f);
        return _mm_cmpeq_epi8(_mm_max_epu8(v, low), low);
    }
    /* Quotes and backslashes. */
    static inline __m128i podterm_qb16(__m128i v) {
        return _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8(0x22)),
                            _mm_cmpeq_epi8(v, _mm_set1_epi8(0x5c)));
    }
    /* What escaping p[0:16] adds, or -1 if a byte >= 0x80 is among them
       (the caller then runs the UTF-8 DFA over them one by one). */
    static inline int podterm_extra16(const uint8_t* p, const uint8_t* table) {
        __m128i v = _mm_loadu_si128((const __m128i*)p);
        unsigned ctl;
        int extra;
        if (_mm_movemask_epi8(v))
            return -1;
        extra = podterm_popcount16((unsigned)_mm_movemask_epi8(podterm_qb16(v)));
        ctl = (unsigned)_mm_movemask_epi8(podterm_ctl16(v));
        while (ctl) {
            extra += table[p[__builtin_ctz(ctl)]];
            ctl &= ctl - 1;
        }
        return extra;
    }
    #else
    #define PODTERM_SIMD 0
    static inline int podterm_extra16(const uint8_t* p, const uint8_t* table) {
        int extra = 0, k;
        for (k = 0; k < 16; k++) {
            if (p[k] >= 0x80)
                return -1;
            extra += table[p[k]];
        }
        return extra;
    }
    #endif
    /* The escape of one byte that needs one (a control character, a quote, a
       backslash) at o, if it fits before end; NULL if it does not. */
    static inline uint8_t* podterm_escape1(uint8_t b, uint8_t* o, uint8_t* end,
                                           const char* shorts) {
        static const char hex[] = "0123456789abcdef";
        if (shorts[b]) {
            if (end - o < 2)
                return NULL;
            o[0] = 0x5c;
            o[1] = (uint8_t)shorts[b];
            return o + 2;
        }
        if (end - o < 6)
            return NULL;
        o[0] = 0x5c; o[1] = 'u'; o[2] = '0'; o[3] = '0';
        o[4] = (uint8_t)hex[b >> 4]; o[5] = (uint8_t)hex[b & 15];
        return o + 6;
    }
    /* Write the escaped p[:n] at out, never at or past end; return where it
       ended, or NULL if end came first.  Bytes >= 0x80 are copied (p was
       judged valid UTF-8).  shorts[b]: the letter of b's two-byte escape, or 0
       for the six-byte one. */
    static uint8_t* podterm_fill(const uint8_t* p, Py_ssize_t n, uint8_t* out,
                                 uint8_t* end, const char* shorts) {
        Py_ssize_t i = 0;
    #if PODTERM_SIMD
        while (i + 16 <= n && end - out >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i*)(p + i));
            unsigned m = (unsigned)_mm_movemask_epi8(
                _mm_or_si128(podterm_ctl16(v), podterm_qb16(v)));
            Py_ssize_t run;
            unsigned pos = 0, k;
            /* Sixteen bytes are stored either way (they fit: checked above); past
               the first byte that needs an escape they are written over. */
            _mm_storeu_si128((__m128i*)out, v);
            if (!m) {
                out += 16;
                i += 16;
                continue;
            }
            /* Each escape in turn (m has a bit per byte that needs one), and the
               plain run before it: already stored for the first, else one more
               sixteen-byte store when it is safe, memcpy near the ends. */
            for (;;) {
                k = m ? (unsigned)__builtin_ctz(m) : 16;
                run = (Py_ssize_t)(k - pos);
                if (run > 0 && pos > 0) {
                    if (i + pos + 16 <= n && end - out >= 16)
                        _mm_storeu_si128((__m128i*)out,
                                         _mm_loadu_si128((const __m128i*)(p + i + pos)));
                    else if (end - out >= run)
                        memcpy(out, p + i + pos, (size_t)run);
                    else
                        return NULL;
                }
                out += run;
                if (!m)
                    break;
                out = podterm_escape1(p[i + k], out, end, shorts);
                if (out == NULL)
                    return NULL;
                pos = k + 1;
                m &= m - 1;
            }
            i += 16;
        }
    #endif
        for (; i < n; i++) {
            uint8_t b = p[i];
            if (b < 0x20 || b == 0x22 || b == 0x5c) {
                out = podterm_escape1(b, out, end, shorts);
                if (out == NULL)
                    return NULL;
            } else {
                if (out >= end)
                    return NULL;
                *out++ = b;
            }
        }
        return out;
    }
    """
    int podterm_extra16(const uint8_t* p, const uint8_t* table) noexcept nogil
    uint8_t* podterm_fill(const uint8_t* p, Py_ssize_t n, uint8_t* out, uint8_t* end,
                          const char* shorts) noexcept nogil


cdef Py_ssize_t _scan(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Bytes the escapes add to ``p[:n]``, or -1 if it is not complete, valid UTF-8."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t stop
    cdef Py_ssize_t extra = 0
    cdef int state = UTF8_ACCEPT
    cdef int e
    cdef uint8_t b
    while i < n:
        if state == UTF8_ACCEPT and i + 16 <= n:
            e = podterm_extra16(p + i, _EXTRA)
            if e >= 0:
                extra += e  # sixteen ASCII bytes
                i += 16
                continue
            stop = i + 16  # a non-ASCII byte among them: one by one
        else:
            stop = i + 1  # inside a character, or the last few bytes
        while i < stop:
            b = p[i]
            if state == UTF8_ACCEPT and b < 0x80:
                extra += _EXTRA[b]
            else:
                state = utf8_step(state, b)
                if state == UTF8_REJECT:
                    return -1
            i += 1
    return extra if state == UTF8_ACCEPT else -1


cdef inline uint8_t* _fill(const uint8_t* p, Py_ssize_t n, uint8_t* out,
                           uint8_t* end) noexcept nogil:
    return podterm_fill(p, n, out, end, _SHORT)


def escape_json_utf8(data):
    """``data`` as the inside of a JSON string, bytes in, bytes out; None if not UTF-8.

    See the module docstring; the contract is the pure-Python twin's.
    """
    cdef Py_buffer view
    cdef Py_ssize_t n, extra
    cdef const uint8_t* src
    cdef uint8_t* dst
    cdef uint8_t* done
    cdef bytes out
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        src = <const uint8_t*>view.buf
        n = view.len
        if n >= _NOGIL_MIN:
            with nogil:
                extra = _scan(src, n)
        else:
            extra = _scan(src, n)
        if extra < 0:
            return None
        if extra == 0:
            if type(data) is bytes:
                return data
            return PyBytes_FromStringAndSize(<const char*>src, n)
        out = PyBytes_FromStringAndSize(NULL, n + extra)
        dst = <uint8_t*>PyBytes_AS_STRING(out)
        if n >= _NOGIL_MIN:
            with nogil:
                done = _fill(src, n, dst, dst + n + extra)
        else:
            done = _fill(src, n, dst, dst + n + extra)
        if done != dst + n + extra:  # cannot happen: the scan counted these very bytes
            raise AssertionError("castesc: the escape did not fill what the scan counted")
        return out
    finally:
        PyBuffer_Release(&view)


cdef class _Views:
    """Every chunk's buffer, held for one call (released when this object goes)."""

    cdef Py_buffer* views
    cdef Py_ssize_t count
    cdef Py_ssize_t got
    cdef Py_ssize_t total

    def __cinit__(self, list items):
        cdef Py_ssize_t i
        self.count = len(items)
        self.views = <Py_buffer*>PyMem_Malloc(max(self.count, 1) * sizeof(Py_buffer))
        if self.views == NULL:
            raise MemoryError()
        for i in range(self.count):
            PyObject_GetBuffer(items[i], &self.views[i], PyBUF_SIMPLE)
            self.got += 1
            self.total += self.views[i].len

    cdef void scan_into(self, Py_ssize_t* extras) noexcept nogil:
        cdef Py_ssize_t i
        for i in range(self.count):
            extras[i] = _scan(<const uint8_t*>self.views[i].buf, self.views[i].len)

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.views != NULL:
            for i in range(self.got):
                PyBuffer_Release(&self.views[i])
            PyMem_Free(self.views)
            self.views = NULL


cdef Py_ssize_t* _scan_views(_Views views) except NULL:
    """Per chunk: what its escapes add, or -1; PyMem_Free the result."""
    cdef Py_ssize_t* extras = <Py_ssize_t*>PyMem_Malloc(max(views.count, 1) * sizeof(Py_ssize_t))
    if extras == NULL:
        raise MemoryError()
    if views.total >= _NOGIL_MIN:
        with nogil:
            views.scan_into(extras)
    else:
        views.scan_into(extras)
    return extras


def scan_many(chunks):
    """Per chunk: the bytes its escapes add, or -1 if it is not complete, valid UTF-8.

    One pass over every chunk, with the GIL released once for all of them.
    ``len(escape_json_utf8(c)) - len(c)`` for the valid ones.
    """
    cdef _Views views = _Views(list(chunks))
    cdef Py_ssize_t* extras = _scan_views(views)
    cdef Py_ssize_t i
    try:
        return [extras[i] for i in range(views.count)]
    finally:
        PyMem_Free(extras)


@cython.final
cdef class Scratch:
    """Memory a :class:`LineBuffer` renders into before it writes; one per writer
    thread, reused from batch to batch (no fresh pages per batch).  Not thread-safe."""

    cdef uint8_t* buf
    cdef Py_ssize_t cap
    cdef bint busy  # a write_to is using it (with the GIL released)

    def __dealloc__(self):
        free(self.buf)

    cdef bint reserve(self, Py_ssize_t n) noexcept nogil:
        if n <= self.cap:
            return True
        free(self.buf)  # nothing in it to keep
        self.cap = 0
        self.buf = <uint8_t*>malloc(max(n, 65536))
        if self.buf == NULL:
            return False
        self.cap = max(n, 65536)
        return True

    cdef void trim(self) noexcept nogil:
        if self.cap > _SCRATCH_KEEP:
            free(self.buf)
            self.buf = NULL
            self.cap = 0

    @property
    def capacity(self):
        """Bytes held now."""
        return self.cap


@cython.final
cdef class LineBuffer:
    """One recording file's pending lines: parts copied as they are (:meth:`raw`) and
    chunks to escape (:meth:`escaped`), in order, until :meth:`write_to` writes them.

    Holds a reference to each part (no copy is made before the write).  Not
    thread-safe; the recording writer uses one per file, from one thread.
    """

    cdef list _objs
    cdef const uint8_t** _ptr
    cdef Py_ssize_t* _len
    cdef Py_ssize_t* _extra  # -1: copy as it is; >= 0: escape, adding this many bytes
    cdef Py_ssize_t _n
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _size
    cdef bint _busy  # write_to runs without the GIL: the parts must not change meanwhile

    def __cinit__(self):
        self._objs = []

    cdef int _check(self) except -1:
        if self._busy:
            raise RuntimeError("castesc: a LineBuffer is not thread-safe; it is being written")
        return 0

    def __dealloc__(self):
        PyMem_Free(self._ptr)
        PyMem_Free(self._len)
        PyMem_Free(self._extra)

    cdef int _push(self, bytes data, Py_ssize_t extra) except -1:
        cdef Py_ssize_t cap
        cdef void* p
        self._check()
        if self._n == self._cap:
            cap = max(16, 2 * self._cap)
            p = PyMem_Realloc(self._ptr, cap * sizeof(uint8_t*))
            if p == NULL:
                raise MemoryError()
            self._ptr = <const uint8_t**>p
            p = PyMem_Realloc(self._len, cap * sizeof(Py_ssize_t))
            if p == NULL:
                raise MemoryError()
            self._len = <Py_ssize_t*>p
            p = PyMem_Realloc(self._extra, cap * sizeof(Py_ssize_t))
            if p == NULL:
                raise MemoryError()
            self._extra = <Py_ssize_t*>p
            self._cap = cap
        self._objs.append(data)
        self._ptr[self._n] = <const uint8_t*>PyBytes_AS_STRING(data)
        self._len[self._n] = PyBytes_GET_SIZE(data)
        self._extra[self._n] = extra
        self._n += 1
        self._size += PyBytes_GET_SIZE(data) + (extra if extra > 0 else 0)
        return 0

    def raw(self, bytes data not None):
        """Append ``data`` as it is (a line's opening, a whole line)."""
        if PyBytes_GET_SIZE(data):
            self._push(data, -1)

    def escaped(self, bytes data not None, Py_ssize_t extra):
        """Append ``data`` JSON-escaped; ``extra`` is what :func:`scan_many` said of it.

        Raises:
            ValueError: ``extra`` is negative (``data`` is not complete UTF-8).
        """
        if extra < 0:
            raise ValueError("castesc: only a chunk scan_many judged valid can be escaped")
        if PyBytes_GET_SIZE(data):
            self._push(data, extra)

    def __len__(self):
        """Bytes the buffered parts make, escaped."""
        return self._size

    def clear(self):
        """Forget every buffered part."""
        self._check()
        self._objs = []
        self._n = 0
        self._size = 0

    cdef Py_ssize_t _render_part(self, Py_ssize_t i, uint8_t* out) noexcept nogil:
        """Write part ``i`` at ``out``; its size, or -1 if its extra was wrong."""
        cdef Py_ssize_t n = self._len[i]
        cdef Py_ssize_t extra = self._extra[i]
        if extra < 0:
            memcpy(out, self._ptr[i], n)
            return n
        if _fill(self._ptr[i], n, out, out + n + extra) != out + n + extra:
            return -1
        return n + extra

    cdef Py_ssize_t _render(self, uint8_t* out) noexcept nogil:
        """Write every part at ``out`` (``_size`` bytes); -1 if a part's extra was wrong."""
        cdef Py_ssize_t i, got
        cdef uint8_t* start = out
        for i in range(self._n):
            got = self._render_part(i, out)
            if got < 0:
                return -1
            out += got
        return out - start

    def getvalue(self):
        """The buffered bytes, escaped (the buffer keeps them)."""
        self._check()
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self._size)
        if self._render(<uint8_t*>PyBytes_AS_STRING(out)) != self._size:
            raise ValueError("castesc: an escaped part was not the size scan_many said")
        return out

    def write_to(self, int fd, Scratch scratch not None):
        """Write every buffered part to ``fd``, in order, and empty the buffer.

        The parts are rendered into ``scratch`` and written with ``write``, a
        slice (:data:`SLICE_BYTES`) at a time, the GIL released throughout.

        Returns:
            the bytes written (``len(self)`` before the call).

        Raises:
            OSError: a ``write`` failed (what was written before it stays written).
            ValueError: an escaped part was not the size ``scan_many`` said
                (whole slices before it stay written; nothing of its own slice).
        """
        cdef Py_ssize_t size = self._size
        cdef Py_ssize_t written = 0
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t i, need, got
        cdef int err = 0
        cdef bint ok = True
        cdef bint bad = False
        self._check()
        if size == 0:
            return 0
        if scratch.busy:
            raise RuntimeError("castesc: a Scratch is not thread-safe; it is being used")
        # Both flags are set and cleared with the GIL held, around the part without it.
        self._busy = scratch.busy = True
        try:
            with nogil:
                ok = scratch.reserve(_SLICE)
                i = 0
                while ok and i < self._n:
                    need = self._len[i] + (self._extra[i] if self._extra[i] > 0 else 0)
                    if pos + need > scratch.cap:
                        if pos:
                            err = _write_all(fd, scratch.buf, pos, &written)
                            pos = 0
                            if err:
                                break
                        if need > scratch.cap:
                            ok = scratch.reserve(need)  # empty now: nothing to keep
                            if not ok:
                                break
                    got = self._render_part(i, scratch.buf + pos)
                    if got != need:
                        bad = True
                        break
                    pos += need
                    i += 1
                    if pos >= _SLICE:
                        err = _write_all(fd, scratch.buf, pos, &written)
                        pos = 0
                        if err:
                            break
                if pos and not err and not bad:
                    err = _write_all(fd, scratch.buf, pos, &written)
                scratch.trim()
        finally:
            self._busy = scratch.busy = False
            self.clear()
        if err:
            raise OSError(err, os.strerror(err))
        if not ok:
            raise MemoryError()
        if bad:
            raise ValueError("castesc: an escaped part was not the size scan_many said")
        return written


cdef int _write_all(int fd, const uint8_t* buf, Py_ssize_t n, Py_ssize_t* written) noexcept nogil:
    """``write`` until ``buf[:n]`` is written (adding to ``*written``); 0 or an errno."""
    cdef Py_ssize_t off = 0
    cdef ssize_t r
    while off < n:
        r = c_write(fd, buf + off, <size_t>(n - off))
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        off += r
        written[0] += r
    return 0

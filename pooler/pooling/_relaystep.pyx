# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay's per-message step, compiled: the same class as relaystep_py.Step.

relaystep_py.py is the reference and documents the events; this module must
behave identically (tests/test_relaystep.py runs both over the same byte
streams). Here recv and send are libc calls on the raw fds and the walk
reads the bytearray through a pointer, so a chunk of messages costs no
Python object unless the relay has to act on one.
"""
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno, EAGAIN, EINTR, EPIPE, EBADF
from libc.string cimport memmove, memchr, memcmp
from libc.stdint cimport uint64_t, int64_t, int32_t

cdef extern from "<errno.h>" nogil:
    int EWOULDBLOCK, ECONNRESET, ETIMEDOUT, ENOTCONN

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_send "send" (int fd, const void *buf, size_t n, int flags)
    ssize_t c_recv "recv" (int fd, void *buf, size_t n, int flags)
    int MSG_NOSIGNAL

IMPLEMENTATION = "compiled"

DEF C_EV_DONE = 0
DEF C_EV_QDONE = 1
DEF C_EV_RELEASE = 2
DEF C_EV_TERMINATE = 3
DEF C_EV_BAD = 4
DEF C_EV_LINK = 8
DEF C_EV_REWRITE = 9
DEF C_EV_PARAM = 10
DEF C_EV_ANSWER = 11
DEF C_EV_CC = 12
DEF C_EV_Z = 13
DEF C_EV_REFUSE = 14
DEF C_EV_SESSION = 15
DEF C_EV_NONE = 16
DEF C_EV_EOF = 17
DEF C_EV_CLOSED = 18
DEF C_EV_PROTO = 19
DEF C_F_AGAIN = 32
DEF C_EV_HELD = 64

EV_DONE, EV_QDONE, EV_RELEASE, EV_TERMINATE, EV_BAD = 0, 1, 2, 3, 4
EV_LINK, EV_REWRITE, EV_PARAM, EV_ANSWER, EV_CC, EV_Z, EV_REFUSE = 8, 9, 10, 11, 12, 13, 14
EV_SESSION = 15
EV_NONE, EV_EOF, EV_CLOSED, EV_PROTO = 16, 17, 18, 19
F_AGAIN, EV_HELD = 32, 64
END_MASK = 7
SESSION, TRANSACTION, STATEMENT = 0, 1, 2

DEF K_OTHER = 0
DEF K_COUNTED = 1
DEF K_SYNC = 2
DEF K_EXT = 3
DEF K_TERMINATE = 4
DEF K_COPY_END = 5
DEF K_BAD = 6
DEF SMALL_LIMIT = 10000
DEF LARGE_LIMIT = 0x3ffffffe

cdef unsigned char CLIENT_KIND[256]
cdef int64_t CLIENT_LIMIT[256]
cdef unsigned char REWRITE_KIND[256]
cdef unsigned char INTEREST[256]
cdef unsigned char INTEREST_PS[256]
cdef int _i
for _i in range(256):
    CLIENT_KIND[_i] = K_BAD
    CLIENT_LIMIT[_i] = LARGE_LIMIT
    REWRITE_KIND[_i] = 0
    INTEREST[_i] = 0
    INTEREST_PS[_i] = 0
for _i in b"df":
    CLIENT_KIND[_i] = K_OTHER
for _i in b"XSCDEHc":
    CLIENT_LIMIT[_i] = SMALL_LIMIT
for _i in b"QF":
    CLIENT_KIND[_i] = K_COUNTED
CLIENT_KIND[ord("S")] = K_SYNC
for _i in b"PBDCEH":
    CLIENT_KIND[_i] = K_EXT
CLIENT_KIND[ord("X")] = K_TERMINATE
for _i in b"cf":
    CLIENT_KIND[_i] = K_COPY_END
for _i in b"PBDC":
    REWRITE_KIND[_i] = 1
for _i in b"ZSG":
    INTEREST[_i] = 1
    INTEREST_PS[_i] = 1
for _i in b"13C":
    INTEREST_PS[_i] = 1


# session_text(): see relaystep_py (the reference). The first three letters, lowered,
# of SET RESET DISCARD DEALLOCATE DECLARE DROP CREATE CLOSE LISTEN UNLISTEN PREPARE.
SESSION_WORDS = (b"set", b"res", b"dis", b"dea", b"dec", b"dro", b"cre", b"clo", b"lis",
                 b"unl", b"pre")
cdef unsigned char BLANK[256]
cdef unsigned char SESSION_FIRST[256]
cdef int SESSION_KEYS[16]
cdef int N_SESSION_KEYS = 0
for _i in range(256):
    BLANK[_i] = 0
    SESSION_FIRST[_i] = 0
for _i in b" \t\n\r\f\0":
    BLANK[_i] = 1
for _w in SESSION_WORDS:
    SESSION_FIRST[_w[0]] = 1
    SESSION_KEYS[N_SESSION_KEYS] = (_w[0] << 16) | (_w[1] << 8) | _w[2]
    N_SESSION_KEYS += 1


cdef inline Py_ssize_t _find(const unsigned char *buf, Py_ssize_t start, Py_ssize_t stop,
                             const char *needle, Py_ssize_t n) nogil:
    """Index of needle in buf[start:stop), -1 if absent."""
    cdef const unsigned char *p
    while stop - start >= n:
        p = <const unsigned char *>memchr(buf + start, needle[0], stop - start - n + 1)
        if p == NULL:
            return -1
        start = p - buf
        if memcmp(p, needle, n) == 0:
            return start
        start += 1
    return -1


cdef bint session_text_c(const unsigned char *buf, Py_ssize_t start, Py_ssize_t stop,
                         bint whole, bint parse) nogil:
    cdef Py_ssize_t i, j, k
    cdef int key
    cdef unsigned char b0
    cdef const unsigned char *p
    if parse:                                       # the text is the second string
        p = <const unsigned char *>memchr(buf + start, 0, stop - start)
        if p == NULL:
            return True
        start = p - buf + 1
        p = <const unsigned char *>memchr(buf + start, 0, stop - start)
        if p == NULL:
            return True
        stop = p - buf
        whole = True
    i = start
    while i < stop and BLANK[buf[i]]:
        i += 1
    if i + 3 > stop:
        return not whole
    b0 = buf[i] | 0x20
    if b0 == 0x2f or b0 == 0x2d:
        return True
    if SESSION_FIRST[b0]:
        key = (b0 << 16) | ((buf[i + 1] | 0x20) << 8) | (buf[i + 2] | 0x20)
        for k in range(N_SESSION_KEYS):
            if SESSION_KEYS[k] == key:
                return True
    if not whole:
        return True
    p = <const unsigned char *>memchr(buf + i, 0x3b, stop - i)
    if p != NULL:
        j = p - buf + 1
        while j < stop:
            if not BLANK[buf[j]] and buf[j] != 0x3b:
                return True
            j += 1
    return _find(buf, i, stop, b"advisory", 8) >= 0 or _find(buf, i, stop, b"set_config", 10) >= 0


def session_text(bytearray buf, Py_ssize_t start, Py_ssize_t stop, bint whole, bint parse):
    """relaystep_py.session_text, for the tests."""
    return session_text_c(<const unsigned char *>PyByteArray_AS_STRING(buf), start, stop,
                          whole, parse)


cdef inline int64_t rd32(const unsigned char *p) nogil:
    return <int32_t>((<uint64_t>p[0] << 24) | (<uint64_t>p[1] << 16) | (<uint64_t>p[2] << 8) | p[3])


cdef inline ssize_t _send(int fd, const char *p, ssize_t n) nogil:
    """Bytes the socket took (maybe fewer); -1 when the peer is gone."""
    cdef ssize_t r
    while True:
        r = c_send(fd, p, n, MSG_NOSIGNAL)
        if r >= 0:
            return r
        if errno == EINTR:
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            return 0
        return -1


cdef inline ssize_t _recv(int fd, char *p, ssize_t n) except -2:
    cdef ssize_t r
    while True:
        r = c_recv(fd, p, n, 0)
        if r >= 0:
            return r
        if errno == EINTR:
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            return -1
        if errno == ECONNRESET or errno == EPIPE or errno == ETIMEDOUT or errno == EBADF or errno == ENOTCONN:
            return 0
        raise OSError(errno, "recv failed")


from pooler.wire.tls import TlsSocket   # a side read and written through Python (TLS)


cdef ssize_t _py_recv(object sock, object view) except -2:
    """A TLS side (wire/tls.TlsSocket): its recv_into, with _recv's results."""
    try:
        return sock.recv_into(view)
    except (BlockingIOError, InterruptedError):
        return -1
    except OSError:
        return 0


cdef ssize_t _py_send(object sock, object view):
    """A TLS side: its send, with _send's results."""
    try:
        return sock.send(view)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        return -1


cdef class Step:
    """Wire state and byte moving of one client link (see relaystep_py)."""
    cdef public object csock, ssock, cbuf, cview, sbuf, sview, pending, tail
    cdef int cfd, sfd
    cdef bint ctls, stls        # that side is a TLS connection: Python-level I/O
    cdef public int mode
    cdef public bint tracked, unsynced, in_copy_in, new_query, hold, want_z, watch, sess_seen, sess_hit
    cdef public Py_ssize_t cend, skept, c_skip, s_skip, msg, mend
    cdef public long long send, recv, queries, xacts, bytes_in, bytes_out
    cdef public int status
    cdef uint64_t _qmask
    cdef Py_ssize_t _pos, _seg, _end
    cdef bint _release, _qdone, _client_side
    cdef const unsigned char *interest

    def __init__(self, client_sock, int mode, bint tracked):
        self.csock = client_sock
        self.cfd = client_sock.fileno()
        self.ctls = type(client_sock) is TlsSocket
        self.ssock = None
        self.sfd = -1
        self.stls = False
        self.mode = mode
        self.tracked = tracked
        if tracked:
            self.interest = INTEREST_PS
        else:
            self.interest = INTEREST
        self.cbuf = self.cview = self.sbuf = self.sview = None
        self.pending = self.tail = None
        self.cend = self.skept = self.c_skip = self.s_skip = self.msg = self.mend = 0
        self.send = self.recv = 0
        self._qmask = 0
        self.unsynced = self.in_copy_in = self.new_query = self.hold = self.want_z = False
        self.watch = mode != SESSION     # look at Query/Parse texts for session statements
        self.sess_seen = self.sess_hit = False
        self.status = 73
        self.queries = self.xacts = self.bytes_in = self.bytes_out = 0
        self._pos = self._seg = self._end = 0
        self._release = self._qdone = self._client_side = False

    @property
    def end(self):
        """Bytes in the buffer of the walk in progress (cend is set when it ends)."""
        return self._end

    @property
    def qmask(self):
        return self._qmask

    @qmask.setter
    def qmask(self, value):
        self._qmask = value

    # -- linking ----------------------------------------------------------------

    def link(self, sock, bytearray buf, view):
        self.ssock = sock
        self.sfd = sock.fileno()
        self.stls = type(sock) is TlsSocket     # per link: no getattr miss (an exception)
        self.sbuf = buf
        self.sview = view
        self.send = self.recv = 0
        self._qmask = 0
        self.unsynced = False
        self.s_skip = self.skept = 0

    def unlink(self):
        self.ssock = None
        self.sfd = -1
        self.sbuf = self.sview = None

    def set_cbuf(self, buf, view):
        self.cbuf = buf
        self.cview = view

    def flush_stats(self, stats):
        stats.query_count += self.queries
        stats.xact_count += self.xacts
        stats.bytes_in += self.bytes_in
        stats.bytes_out += self.bytes_out
        self.queries = self.xacts = self.bytes_in = self.bytes_out = 0

    def cut(self):
        cdef object buf = self.cbuf if self._client_side else self.sbuf
        cdef char *p = PyByteArray_AS_STRING(buf)
        self.hold = True
        out = PyBytes_FromStringAndSize(p + self._seg, self.msg - self._seg)
        self._seg = self.mend
        return out

    cdef inline void _start_walk(self, Py_ssize_t skip, bint client):
        cdef Py_ssize_t end = self._end, pos = 0
        if skip:
            if skip >= end:
                skip -= end
                pos = end
            else:
                pos = skip
                skip = 0
            if client:
                self.c_skip = skip
            else:
                self.s_skip = skip
        self._pos = pos
        self._seg = 0
        self._client_side = client
        self.hold = False
        self._release = self._qdone = False

    # -- client -> server ---------------------------------------------------------

    def client_in(self):
        cdef object buf = self.cbuf
        cdef ssize_t n
        if self.ctls:
            n = _py_recv(self.csock, self.cview[self.cend:])
        else:
            n = _recv(self.cfd, PyByteArray_AS_STRING(buf) + self.cend,
                      PyByteArray_GET_SIZE(buf) - self.cend)
        if n <= 0:
            return C_EV_EOF if n == 0 else C_EV_NONE
        self._end = self.cend + n
        self._start_walk(self.c_skip, True)
        return self._client_walk()

    def client_start(self):
        self._end = self.cend
        self._start_walk(self.c_skip, True)
        return self._client_walk()

    def client_walk(self):
        return self._client_walk()

    cdef int _client_walk(self) except -1:
        cdef const unsigned char *buf = <const unsigned char *>PyByteArray_AS_STRING(self.cbuf)
        cdef Py_ssize_t end = self._end, pos = self._pos, mend
        cdef int64_t ln, outstanding
        cdef unsigned char t, kind
        cdef int code = C_EV_DONE
        cdef bint hit
        while end - pos >= 5:
            t = buf[pos]
            ln = rd32(buf + pos + 1)
            kind = CLIENT_KIND[t]
            hit = False
            if kind == K_BAD or ln < 4 or ln > CLIENT_LIMIT[t]:
                code = C_EV_BAD          # refused: nothing of it is forwarded
                break
            mend = pos + 1 + ln
            if kind == K_TERMINATE:
                code = C_EV_TERMINATE
                break
            if self.sfd < 0:
                self._pos = self.msg = pos
                self.mend = mend
                return C_EV_LINK
            if kind == K_COUNTED or (kind == K_SYNC and not self.in_copy_in):
                if t == 0x51 and self.watch:
                    if mend > end and mend - pos <= PyByteArray_GET_SIZE(self.cbuf):
                        break
                    hit = session_text_c(buf, pos + 5, mend if mend < end else end,
                                         mend <= end, False)
                outstanding = self.send - self.recv
                if not outstanding:
                    self.new_query = True
                if kind == K_COUNTED and outstanding < 64:
                    self._qmask |= (<uint64_t>1) << outstanding
                self.send += 1
                self.unsynced = False
            elif kind == K_EXT:
                if t == 0x50 and self.watch:
                    if mend > end and mend - pos <= PyByteArray_GET_SIZE(self.cbuf):
                        break
                    hit = session_text_c(buf, pos + 5, mend if mend < end else end,
                                         mend <= end, True)
                    if hit:
                        self.sess_hit = True
                self.unsynced = True
                if self.tracked and REWRITE_KIND[t]:
                    if mend > end:
                        break
                    self._pos = mend
                    self.msg = pos
                    self.mend = mend
                    return C_EV_REWRITE
            elif kind == K_COPY_END:
                self.in_copy_in = False
            if hit:
                self.sess_hit = True
                self.msg = pos
                if mend > end:
                    self.c_skip = mend - end
                    self._pos = self.mend = end
                else:
                    self._pos = self.mend = mend
                return C_EV_SESSION
            if mend > end:
                self.c_skip = mend - end
                pos = end
                break
            pos = mend
        return self._finish(pos, True, code)

    # -- server -> client ---------------------------------------------------------

    def server_in(self):
        cdef object buf = self.sbuf
        cdef ssize_t n
        if self.stls:
            n = _py_recv(self.ssock, self.sview[self.skept:])
        else:
            n = _recv(self.sfd, PyByteArray_AS_STRING(buf) + self.skept,
                      PyByteArray_GET_SIZE(buf) - self.skept)
        if n <= 0:
            return C_EV_EOF if n == 0 else C_EV_NONE
        self._end = self.skept + n
        self._start_walk(self.s_skip, False)
        return self._server_walk()

    def server_walk(self):
        return self._server_walk()

    cdef int _server_walk(self) except -1:
        cdef const unsigned char *buf = <const unsigned char *>PyByteArray_AS_STRING(self.sbuf)
        cdef Py_ssize_t end = self._end, pos = self._pos, mend
        cdef int64_t ln
        cdef unsigned char t, status
        cdef int ev, code
        cdef const unsigned char *interest = self.interest
        while end - pos >= 5:
            t = buf[pos]
            ln = rd32(buf + pos + 1)
            if ln < 4:
                return C_EV_PROTO
            mend = pos + 1 + ln
            if interest[t]:
                if mend > end:
                    break
                ev = 0
                if t == 0x5A:
                    self.recv += 1
                    self._qmask >>= 1
                    status = buf[pos + 5]
                    self.status = status
                    self.queries += 1
                    if self.recv == self.send:
                        self._qdone = True
                        if status == 73:
                            self.xacts += 1
                            if self.mode != 0 and not self.unsynced and not self.c_skip:
                                self._release = True
                        elif self.mode == 2:
                            ev = C_EV_REFUSE
                    if not ev and self.want_z:
                        ev = C_EV_Z
                elif t == 0x53:
                    ev = C_EV_PARAM
                elif t == 0x47:
                    self.in_copy_in = True
                    if self.send > self.recv and not (self._qmask & 1):
                        self.send -= 1
                elif t == 0x43:
                    if buf[pos + 5] == 0x44:
                        ev = C_EV_CC
                else:
                    ev = C_EV_ANSWER
                if ev:
                    self._pos = mend
                    self.msg = pos
                    self.mend = mend
                    return ev
            if mend > end:
                self.s_skip = mend - end
                pos = end
                break
            pos = mend
        code = C_EV_DONE
        if self._qdone:
            code = C_EV_QDONE
            if self._release and pos == end and not self.s_skip:
                code = C_EV_RELEASE
        return self._finish(pos, False, code)

    # -- end of a walk --------------------------------------------------------------

    cdef int _finish(self, Py_ssize_t pos, bint client, int code) except -1:
        cdef object buf = self.cbuf if client else self.sbuf
        cdef char *p = PyByteArray_AS_STRING(buf)
        cdef int out = self.sfd if client else self.cfd
        cdef Py_ssize_t seg = self._seg, end = self._end, rest
        cdef ssize_t n
        if self.hold:
            self.tail = PyBytes_FromStringAndSize(p + seg, pos - seg)
            code |= C_EV_HELD
        elif pos > seg and out >= 0:
            if self.stls if client else self.ctls:
                n = _py_send(self.ssock if client else self.csock,
                             (self.cview if client else self.sview)[seg:pos])
            else:
                n = _send(out, p + seg, pos - seg)
            if n < 0:
                return C_EV_CLOSED
            if n < pos - seg:
                self.pending = PyBytes_FromStringAndSize(p + seg + n, pos - seg - n)
                code |= C_F_AGAIN
        if client:
            self.bytes_in += pos
        else:
            self.bytes_out += pos
        rest = end - pos
        if rest and pos:
            memmove(p, p + pos, rest)
        if client:
            self.cend = rest
        else:
            self.skept = rest
        return code

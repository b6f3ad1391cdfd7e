"""The relay's per-message step in pure Python: the reference twin of _relaystep.pyx.

A `Step` holds the wire state of one client's link (counted requests, skip
counts, transaction status) and moves bytes: `client_in` / `server_in` read
into the link's buffer, walk the message headers, send what can be forwarded
and return an event code. The relay acts only on events; everything between
two events is the step's. _relaystep.pyx implements the same class, attribute
for attribute, in Cython; tests/test_relaystep.py runs both over byte streams.

Events (return values; F_AGAIN may be or-ed onto the end-of-walk ones):

end of a walk (the buffer is compacted; `cend` / `skept` say what is kept)
  EV_DONE       nothing for the relay to do
  EV_QDONE      every counted request was answered in this chunk (server side)
  EV_RELEASE    ... and the server is at a release point
  EV_TERMINATE  the client sent Terminate (not forwarded)
  EV_BAD        the client sent a message the pooler refuses: an unknown type,
                a length under 4 or over PostgreSQL's limit for its type; the
                walk stopped before it (what came before was sent) and its
                header is at cbuf[0:5]
  F_AGAIN       the socket took only part: `pending` holds the rest, the
                relay must send it before reading that direction again
  EV_HELD       (with EV_* bits) `hold` was set: nothing was sent; `tail` holds
                the bytes after the last cut, the relay sends parts + tail
mid-walk (resume with client_walk() / server_walk())
  EV_LINK       a message needs a server and none is linked (msg = its start)
  EV_REWRITE    a whole P/B/D/C while rewriting: buf[msg:mend]
  EV_PARAM      ParameterStatus buf[msg:mend]
  EV_ANSWER     ParseComplete / CloseComplete while tracking statements
  EV_CC         CommandComplete starting with 'D' while tracking statements
  EV_Z          ReadyForQuery while `want_z` (the relay sets it while the server
                owes answers to statements it rewrote; after bookkeeping)
  EV_REFUSE     statement mode: a ReadyForQuery in a transaction (after bookkeeping)
  EV_SESSION    a Query/Parse whose text may change session state (after it was
                counted): buf[msg:mend] is what of it is in the buffer
others
  EV_NONE       recv found nothing (EAGAIN)
  EV_EOF        the peer closed (or reset) the connection
  EV_CLOSED     a send failed: the other peer is gone
  EV_PROTO      invalid message length

Session statements (sessionstate.py): with `watch` set (transaction and statement
pooling), a Query or Parse whose text may change session state sets `sess_hit`
and is reported (EV_SESSION; a Parse being rewritten comes as EV_REWRITE): the
relay looks at the text and sets `sess_seen` (read the state back at the
release point) unless it only has transaction-local effect. `session_text` is the test,
the same in both twins; a text not wholly in the buffer counts as a hit.
"""
from __future__ import annotations

import errno
from socket import socket

from pooler.wire.protocol import unpack_i32

IMPLEMENTATION = "python"

EV_DONE, EV_QDONE, EV_RELEASE, EV_TERMINATE, EV_BAD = 0, 1, 2, 3, 4
EV_LINK, EV_REWRITE, EV_PARAM, EV_ANSWER, EV_CC, EV_Z, EV_REFUSE = 8, 9, 10, 11, 12, 13, 14
EV_SESSION = 15
EV_NONE, EV_EOF, EV_CLOSED, EV_PROTO = 16, 17, 18, 19
F_AGAIN, EV_HELD = 32, 64
END_MASK = 7

SESSION, TRANSACTION, STATEMENT = 0, 1, 2
QMASK_BITS = 64                    # pipelined Queries tracked for COPY (as in the C twin)

K_OTHER, K_COUNTED, K_SYNC, K_EXT, K_TERMINATE, K_COPY_END, K_BAD = range(7)
CLIENT_KIND = bytearray([K_BAD]) * 256
for _t in b"df":
    CLIENT_KIND[_t] = K_OTHER
# PostgreSQL's own limits on a frontend message's length (pq_getmessage's maxlen):
# 10,000 bytes for the small control messages, MaxAllocSize - 1 for the others.
SMALL_LIMIT, LARGE_LIMIT = 10000, 0x3ffffffe
CLIENT_LIMIT = [LARGE_LIMIT] * 256
for _t in b"XSCDEHc":
    CLIENT_LIMIT[_t] = SMALL_LIMIT
for _t in b"QF":
    CLIENT_KIND[_t] = K_COUNTED
CLIENT_KIND[ord("S")] = K_SYNC
for _t in b"PBDCEH":
    CLIENT_KIND[_t] = K_EXT
CLIENT_KIND[ord("X")] = K_TERMINATE
for _t in b"cf":
    CLIENT_KIND[_t] = K_COPY_END
REWRITE_KIND = bytearray(256)
for _t in b"PBDC":
    REWRITE_KIND[_t] = 1
# Server types whose whole body the step waits for; 1/3/C only when tracking.
SERVER_INTEREST = bytearray(256)
for _t in b"ZSG":
    SERVER_INTEREST[_t] = 1
SERVER_INTEREST_PS = bytearray(SERVER_INTEREST)
for _t in b"13C":
    SERVER_INTEREST_PS[_t] = 1

# session_text(): the first three letters (ASCII, lowered) of a statement that may
# change session state: SET, RESET, DISCARD, DEALLOCATE, DECLARE, DROP, CREATE, CLOSE,
# LISTEN, UNLISTEN, PREPARE. A comment first ('/', '-') counts as a hit too.
SESSION_WORDS = (b"set", b"res", b"dis", b"dea", b"dec", b"dro", b"cre", b"clo", b"lis",
                 b"unl", b"pre")
_BLANK = bytearray(256)
for _t in b" \t\n\r\f\0":
    _BLANK[_t] = 1
_SESSION_FIRST = bytearray(256)
for _w in SESSION_WORDS:
    _SESSION_FIRST[_w[0]] = 1
_SESSION_KEYS = frozenset((w[0] << 16) | (w[1] << 8) | w[2] for w in SESSION_WORDS)
_QUERY, _PARSE = 0x51, 0x50


def session_text(buf: bytearray, start: int, stop: int, whole: bool, parse: bool) -> bool:
    """May the statement text in buf[start:stop) (a Query body, or with `parse` a Parse
    body: name, then text) change session state? True for a session keyword first, a
    comment first, a second statement after a ';', a call of an advisory-lock function
    or of set_config, and whenever the text is not all there (`whole` False)."""
    if parse:                                       # the text is the second string
        start = buf.find(0, start, stop) + 1
        stop = buf.find(0, start, stop) if start else -1
        if stop < 0:
            return True
        whole = True                                # its end is in the buffer
    blank = _BLANK
    i = start
    while i < stop and blank[buf[i]]:
        i += 1
    if i + 3 > stop:
        return not whole
    b0 = buf[i] | 0x20
    if b0 == 0x2f or b0 == 0x2d:                    # '/' or '-': a comment first
        return True
    if _SESSION_FIRST[b0] and (b0 << 16 | (buf[i + 1] | 0x20) << 8 | (buf[i + 2] | 0x20)) in _SESSION_KEYS:
        return True
    if not whole:
        return True
    j = buf.find(0x3b, i, stop)                     # ';' followed by a statement
    if j >= 0:
        j += 1
        while j < stop:
            if not blank[buf[j]] and buf[j] != 0x3b:
                return True
            j += 1
    return buf.find(b"advisory", i, stop) >= 0 or buf.find(b"set_config", i, stop) >= 0


_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.EBADF, errno.ENOTCONN)


def _send(sock: socket, data: memoryview) -> int:
    """Bytes the socket took (maybe fewer); -1 when the peer is gone."""
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        return -1


def _recv(sock: socket, view: memoryview) -> int:
    try:
        return sock.recv_into(view)
    except (BlockingIOError, InterruptedError):
        return -1
    except OSError as exc:
        if exc.errno in _GONE:
            return 0
        raise


class Step:
    """Wire state and byte moving of one client link (see the module docstring)."""

    def __init__(self, client_sock: socket, mode: int, tracked: bool) -> None:
        self.csock = client_sock
        self.ssock: socket | None = None
        self.mode = mode
        self.tracked = tracked          # prepared statements: rewrite P/B/D/C, follow 1/3/C
        self.interest = SERVER_INTEREST_PS if tracked else SERVER_INTEREST
        self.cbuf: bytearray | None = None
        self.cview: memoryview | None = None
        self.cend = 0
        self.sbuf: bytearray | None = None
        self.sview: memoryview | None = None
        self.skept = 0
        self.send = self.recv = self.qmask = 0
        self.unsynced = self.in_copy_in = False
        self.c_skip = self.s_skip = 0
        self.status = 73                # 'I'
        self.new_query = False          # a request was sent while none was outstanding
        self.hold = False               # the relay cut messages: it sends parts + tail itself
        self.want_z = False             # report ReadyForQuery (EV_Z): set by the relay
        self.watch = mode != SESSION    # look at Query/Parse texts for session statements
        self.sess_hit = False           # ... this one may (the relay clears it)
        self.sess_seen = False          # ... the relay must read the state back
        self.pending: bytes | None = None
        self.tail: bytes | None = None
        self.msg = self.mend = 0        # the message of a mid-walk event
        self.queries = self.xacts = self.bytes_in = self.bytes_out = 0
        self._pos = self._seg = self._end = 0
        self._release = self._qdone = False

    @property
    def end(self) -> int:
        """Bytes in the buffer of the walk in progress (cend is set when it ends)."""
        return self._end

    # -- linking ----------------------------------------------------------------

    def link(self, sock: socket, buf: bytearray, view: memoryview) -> None:
        self.ssock = sock
        self.sbuf = buf
        self.sview = view
        self.send = self.recv = self.qmask = 0
        self.unsynced = False
        self.s_skip = self.skept = 0

    def unlink(self) -> None:
        self.ssock = None
        self.sbuf = self.sview = None

    def set_cbuf(self, buf: bytearray | None, view: memoryview | None) -> None:
        self.cbuf = buf
        self.cview = view

    def flush_stats(self, stats) -> None:
        """Add the counters gathered since the last flush to the pool's Stats."""
        stats.query_count += self.queries
        stats.xact_count += self.xacts
        stats.bytes_in += self.bytes_in
        stats.bytes_out += self.bytes_out
        self.queries = self.xacts = self.bytes_in = self.bytes_out = 0

    def cut(self) -> bytes:
        """Drop the current event's message: returns the unsent bytes before it."""
        self.hold = True
        view = self.cview if self._client_side else self.sview
        out = bytes(view[self._seg:self.msg])
        self._seg = self.mend
        return out

    # -- client -> server ---------------------------------------------------------

    def client_in(self) -> int:
        """recv from the client into cbuf[cend:], then walk; the buffer must be set."""
        n = _recv(self.csock, self.cview[self.cend:])
        if n <= 0:
            return EV_EOF if n == 0 else EV_NONE
        self._end = self.cend + n
        self._start_walk(self.c_skip, True)
        return self.client_walk()

    def client_start(self) -> int:
        """Walk bytes already in cbuf[:cend] (read ahead during the handshake)."""
        self._end = self.cend
        self._start_walk(self.c_skip, True)
        return self.client_walk()

    def _start_walk(self, skip: int, client: bool) -> None:
        end = self._end
        pos = 0
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

    def client_walk(self) -> int:
        buf = self.cbuf
        end = self._end
        pos = self._pos
        kinds = CLIENT_KIND
        code = EV_DONE
        while end - pos >= 5:
            t = buf[pos]
            ln = unpack_i32(buf, pos + 1)[0]
            kind = kinds[t]
            hit = False
            if kind == K_BAD or ln < 4 or ln > CLIENT_LIMIT[t]:
                code = EV_BAD            # refused: nothing of it is forwarded
                break
            mend = pos + 1 + ln
            if kind == K_TERMINATE:
                code = EV_TERMINATE
                break
            if self.ssock is None:
                self._pos = self.msg = pos
                self.mend = mend
                return EV_LINK
            if kind == K_COUNTED or (kind == K_SYNC and not self.in_copy_in):
                if t == _QUERY and self.watch:
                    if mend > end and mend - pos <= len(buf):
                        break            # its text is looked at whole (sessionstate.py)
                    hit = session_text(buf, pos + 5, mend if mend < end else end,
                                       mend <= end, False)
                outstanding = self.send - self.recv
                if not outstanding:
                    self.new_query = True
                if kind == K_COUNTED and outstanding < QMASK_BITS:
                    self.qmask |= 1 << outstanding
                self.send += 1
                self.unsynced = False
            elif kind == K_EXT:
                if t == _PARSE and self.watch:
                    if mend > end and mend - pos <= len(buf):
                        break
                    hit = session_text(buf, pos + 5, mend if mend < end else end,
                                       mend <= end, True)
                    if hit:
                        self.sess_hit = True    # (a rewritten Parse: EV_REWRITE, not EV_SESSION)
                self.unsynced = True
                if self.tracked and REWRITE_KIND[t]:
                    if mend > end:
                        break            # the whole message is needed to rewrite it
                    self._pos = mend
                    self.msg = pos
                    self.mend = mend
                    return EV_REWRITE
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
                return EV_SESSION
            if mend > end:
                self.c_skip = mend - end
                pos = end
                break
            pos = mend
        return self._finish(pos, True, code)

    # -- server -> client ---------------------------------------------------------

    def server_in(self) -> int:
        n = _recv(self.ssock, self.sview[self.skept:])
        if n <= 0:
            return EV_EOF if n == 0 else EV_NONE
        self._end = self.skept + n
        self._start_walk(self.s_skip, False)
        return self.server_walk()

    def server_walk(self) -> int:
        buf = self.sbuf
        end = self._end
        pos = self._pos
        interest = self.interest
        while end - pos >= 5:
            t = buf[pos]
            ln = unpack_i32(buf, pos + 1)[0]
            if ln < 4:
                return EV_PROTO
            mend = pos + 1 + ln
            if interest[t]:
                if mend > end:
                    break
                ev = 0
                if t == 0x5A:                        # 'Z' ReadyForQuery
                    self.recv += 1
                    self.qmask >>= 1
                    status = buf[pos + 5]
                    self.status = status
                    self.queries += 1
                    if self.recv == self.send:
                        self._qdone = True
                        if status == 73:
                            self.xacts += 1
                            if self.mode != SESSION and not self.unsynced and not self.c_skip:
                                self._release = True
                        elif self.mode == STATEMENT:
                            ev = EV_REFUSE
                    if not ev and self.want_z:
                        ev = EV_Z
                elif t == 0x53:                      # 'S' ParameterStatus
                    ev = EV_PARAM
                elif t == 0x47:                      # 'G' CopyInResponse
                    self.in_copy_in = True
                    if self.send > self.recv and not self.qmask & 1:
                        # COPY from an Execute whose Sync was already sent: the server
                        # ignores Syncs during copy-in; the one after CopyDone counts.
                        self.send -= 1
                elif t == 0x43:                      # 'C' (tracked only)
                    if buf[pos + 5] == 0x44:
                        ev = EV_CC
                else:                                # '1' / '3' (tracked only)
                    ev = EV_ANSWER
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
        code = EV_DONE
        if self._qdone:
            code = EV_QDONE
            if self._release and pos == end and not self.s_skip:
                code = EV_RELEASE
        return self._finish(pos, False, code)

    # -- end of a walk --------------------------------------------------------------

    def _finish(self, pos: int, client: bool, code: int) -> int:
        """Send [seg:pos) (unless held), keep [pos:end) at the buffer start."""
        if client:
            view, buf, out = self.cview, self.cbuf, self.ssock
        else:
            view, buf, out = self.sview, self.sbuf, self.csock
        seg = self._seg
        end = self._end
        if self.hold:
            self.tail = bytes(view[seg:pos])
            code |= EV_HELD
        elif pos > seg:
            if out is None:
                # Only a Terminate with nothing linked gets here with bytes before it
                # and no server: those bytes had a server (else EV_LINK) - unreachable.
                pass
            else:
                n = _send(out, view[seg:pos])
                if n < 0:
                    return EV_CLOSED
                if n < pos - seg:
                    self.pending = bytes(view[seg + n:pos])
                    code |= F_AGAIN
        if client:
            self.bytes_in += pos
        else:
            self.bytes_out += pos
        rest = end - pos
        if rest and pos:
            buf[:rest] = bytes(view[pos:end])
        if client:
            self.cend = rest
        else:
            self.skept = rest
        return code

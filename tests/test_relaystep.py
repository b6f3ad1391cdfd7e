"""The relay's step over byte streams: the compiled and the pure-Python twin, same tests."""
from __future__ import annotations

import socket
import struct

import pytest

from pooler.pooling import relaystep_py

IMPLS = [relaystep_py]
try:
    from pooler.pooling import _relaystep
    IMPLS.append(_relaystep)
except ImportError:        # no compiler at install time: only the reference runs
    _relaystep = None


def m(t: bytes, body: bytes = b"") -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


Q = m(b"Q", b"select 1\0")
Z_I, Z_T, Z_E = m(b"Z", b"I"), m(b"Z", b"T"), m(b"Z", b"E")
ROWS = m(b"T", b"\0\0") + m(b"D", b"\0\0") + m(b"C", b"SELECT 1\0")
SYNC = m(b"S")
PARSE = m(b"P", b"s1\0select 1\0\0\0")
BIND = m(b"B", b"\0s1\0\0\0\0\0\0\0")
EXEC = m(b"E", b"\0\0\0\0\0")


class Link:
    """A step with a client and a server on socketpairs; the test plays both peers."""

    def __init__(self, impl, mode=1, tracked=False, bufsize=65536):
        self.impl = impl
        self.cpeer, cs = socket.socketpair()
        self.speer, ss = socket.socketpair()
        cs.setblocking(False)
        ss.setblocking(False)
        self.cs, self.ss = cs, ss
        self.step = impl.Step(cs, mode, tracked)
        self.cbuf = bytearray(bufsize)
        self.step.set_cbuf(self.cbuf, memoryview(self.cbuf))
        self.sbuf = bytearray(bufsize)

    def link(self):
        self.step.link(self.ss, self.sbuf, memoryview(self.sbuf))

    def client(self, data: bytes) -> int:
        self.cpeer.sendall(data)
        return self.step.client_in()

    def server(self, data: bytes) -> int:
        self.speer.sendall(data)
        return self.step.server_in()

    def at_server(self) -> bytes:
        return _drain(self.speer)

    def at_client(self) -> bytes:
        return _drain(self.cpeer)

    def close(self):
        for s in (self.cpeer, self.speer, self.cs, self.ss):
            s.close()


def _drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


@pytest.fixture(params=IMPLS, ids=lambda i: i.IMPLEMENTATION)
def impl(request):
    return request.param


@pytest.fixture
def mk(impl):
    links = []

    def make(**kw) -> Link:
        link = Link(impl, **kw)
        links.append(link)
        return link
    yield make
    for link in links:
        link.close()


def test_both_implementations_built():
    # CI builds the compiled step (bin/setup fails without it there); here it must exist
    # unless the machine has no compiler, in which case the pure one is all we have.
    assert _relaystep is None or _relaystep.IMPLEMENTATION == "compiled"
    assert relaystep_py.IMPLEMENTATION == "python"


def test_query_links_forwards_and_releases(mk, impl):
    link = mk()
    st = link.step
    assert link.client(Q) == impl.EV_LINK
    assert (st.msg, st.mend) == (0, len(Q))
    link.link()
    assert st.client_walk() == impl.EV_DONE
    assert st.new_query and st.send == 1 and st.cend == 0
    assert link.at_server() == Q
    assert link.server(ROWS + Z_I) == impl.EV_RELEASE
    assert link.at_client() == ROWS + Z_I
    assert (st.recv, st.status, st.queries, st.xacts) == (1, ord("I"), 1, 1)
    assert st.bytes_in == len(Q) and st.bytes_out == len(ROWS + Z_I)


def test_session_mode_never_releases(mk, impl):
    link = mk(mode=impl.SESSION)
    link.link()
    assert link.client(Q) == impl.EV_DONE
    assert link.server(ROWS + Z_I) == impl.EV_QDONE


def test_open_transaction_is_not_a_release_point(mk, impl):
    link = mk()
    link.link()
    link.client(Q)
    assert link.server(ROWS + Z_T) == impl.EV_QDONE
    assert link.step.status == ord("T") and link.step.xacts == 0
    link.client(Q)
    assert link.server(ROWS + Z_I) == impl.EV_RELEASE


def test_pipelined_queries_release_after_the_last_answer(mk, impl):
    link = mk()
    link.link()
    link.client(Q + Q + Q)
    assert link.step.send == 3
    assert link.server(ROWS + Z_I + ROWS + Z_I) == impl.EV_DONE
    assert link.server(ROWS + Z_I) == impl.EV_RELEASE
    assert link.at_client() == (ROWS + Z_I) * 3


def test_unsynced_extended_batch_keeps_the_server(mk, impl):
    link = mk()
    link.link()
    link.client(PARSE + BIND + EXEC)
    assert link.step.unsynced and link.step.send == 0
    assert link.client(SYNC) == impl.EV_DONE
    assert not link.step.unsynced and link.step.send == 1
    assert link.server(m(b"1") + m(b"2") + m(b"C", b"SELECT 1\0") + Z_I) == impl.EV_RELEASE
    # An answered Sync while a Parse follows it unsynced: no release.
    link.client(SYNC + PARSE)
    assert link.server(Z_I) == impl.EV_QDONE


def test_message_split_across_reads_is_forwarded_in_pieces(mk, impl):
    # Session mode: transaction pooling awaits a Query whole (test_session_text_...).
    link = mk(mode=impl.SESSION)
    link.link()
    big = m(b"Q", b"x" * 1000 + b"\0")
    assert link.client(big[:3]) == impl.EV_DONE
    assert link.step.cend == 3 and link.at_server() == b""       # header incomplete: kept
    assert link.client(big[3:100]) == impl.EV_DONE
    assert link.step.c_skip == len(big) - 100 and link.step.cend == 0
    assert link.at_server() == big[:100]
    assert link.client(big[100:] + Q[:2]) == impl.EV_DONE
    assert link.step.c_skip == 0 and link.step.cend == 2
    assert link.client(Q[2:]) == impl.EV_DONE
    assert link.at_server() == big[100:] + Q
    assert link.step.send == 2


def test_ready_for_query_split_is_awaited_whole(mk, impl):
    link = mk()
    link.link()
    link.client(Q)
    assert link.server(ROWS + Z_I[:4]) == impl.EV_DONE
    assert link.step.skept == 4 and link.at_client() == ROWS
    assert link.server(Z_I[4:]) == impl.EV_RELEASE
    assert link.at_client() == Z_I


def test_large_data_row_passes_in_pieces_and_blocks_release(mk, impl):
    link = mk()
    link.link()
    link.client(Q)
    row = m(b"D", b"y" * 200000)
    got = link.server(row[:70000])
    assert got == impl.EV_DONE and link.step.s_skip == len(row) - 65536
    link.speer.setblocking(False)
    rest = row[70000:]
    while link.step.s_skip:
        if rest:
            try:
                rest = rest[link.speer.send(rest):]
            except BlockingIOError:
                pass
        assert link.step.server_in() in (impl.EV_DONE, impl.EV_NONE)
    assert not rest
    assert link.server(Z_I) == impl.EV_RELEASE
    assert link.at_client() == row + Z_I


def test_terminate_is_never_forwarded(mk, impl):
    link = mk()
    link.link()
    assert link.client(Q + m(b"X")) == impl.EV_TERMINATE
    assert link.at_server() == Q


def test_terminate_without_a_server(mk, impl):
    link = mk()
    assert link.client(m(b"X")) == impl.EV_TERMINATE


def test_invalid_length_is_a_protocol_error(mk, impl):
    link = mk()
    link.link()
    assert link.client(b"Q\0\0\0\x02") == impl.EV_BAD
    assert link.server(b"Z\xff\xff\xff\xff") == impl.EV_PROTO


@pytest.mark.parametrize("bad", [
    m(b"Y", b"x"),                                   # no such frontend message
    m(b"p", b"secret\0"),                            # a password message after login
    b"Q" + struct.pack("!i", 0x3fffffff),            # longer than PostgreSQL accepts
    b"S" + struct.pack("!i", 10001),                 # a Sync is small
])
def test_refused_client_messages_stop_the_walk_before_them(mk, impl, bad):
    link = mk()
    link.link()
    ev = link.client(Q + bad)
    assert ev == impl.EV_BAD
    assert link.at_server() == Q                     # what came before went through
    st = link.step
    assert st.send == 1 and st.cend == len(bad) and bytes(link.cbuf[:5]) == bad[:5]


def test_a_refused_message_needs_no_server(mk, impl):
    link = mk()
    assert link.client(m(b"Y")) == impl.EV_BAD       # not EV_LINK: no server is taken


def test_copy_data_and_large_messages_pass(mk, impl):
    link = mk()
    link.link()
    big = m(b"d", b"x" * 20000) + m(b"c")
    assert link.client(big) == impl.EV_DONE
    assert link.at_server() == big


def test_eof_and_nothing_to_read(mk, impl):
    link = mk()
    link.link()
    assert link.step.client_in() == impl.EV_NONE
    assert link.step.server_in() == impl.EV_NONE
    link.speer.close()
    assert link.step.server_in() == impl.EV_EOF
    link.cpeer.shutdown(socket.SHUT_WR)
    assert link.step.client_in() == impl.EV_EOF


def test_send_to_a_gone_peer_is_closed(mk, impl):
    link = mk()
    link.link()
    link.speer.close()
    assert link.client(Q) == impl.EV_CLOSED


def test_full_socket_leaves_pending_bytes(mk, impl):
    link = mk()
    link.link()
    link.client(Q)
    link.cpeer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    link.cs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sent = b""
    got = 0
    for _ in range(100):
        chunk = m(b"D", b"z" * 30000)
        ev = link.server(chunk)
        sent += chunk
        if ev & impl.F_AGAIN:
            got = ev
            break
    assert got & impl.F_AGAIN and (got & impl.END_MASK) == impl.EV_DONE
    pending = link.step.pending
    assert pending and sent.endswith(pending)
    assert link.at_client() + pending == sent


def test_parameter_status_event(mk, impl):
    link = mk()
    link.link()
    link.client(Q)
    ps = m(b"S", b"TimeZone\0UTC\0")
    assert link.server(m(b"C", b"SET\0") + ps + Z_I) == impl.EV_PARAM
    st = link.step
    assert bytes(link.sbuf[st.msg:st.mend]) == ps
    assert st.server_walk() == impl.EV_RELEASE
    assert link.at_client() == m(b"C", b"SET\0") + ps + Z_I


def test_statement_mode_refuses_a_transaction(mk, impl):
    link = mk(mode=impl.STATEMENT)
    link.link()
    link.client(Q)
    assert link.server(m(b"C", b"BEGIN\0") + Z_T) == impl.EV_REFUSE
    st = link.step
    before = st.cut()                     # the relay drops the ReadyForQuery
    assert before == m(b"C", b"BEGIN\0")
    ev = st.server_walk()
    assert ev & impl.EV_HELD and (ev & impl.END_MASK) == impl.EV_QDONE
    assert st.tail == b"" and link.at_client() == b""


def test_rewrite_events_and_cut(mk, impl):
    link = mk(tracked=True)
    link.link()
    assert link.client(PARSE + BIND + EXEC + SYNC) == impl.EV_REWRITE
    st = link.step
    assert bytes(link.cbuf[st.msg:st.mend]) == PARSE
    assert st.client_walk() == impl.EV_REWRITE          # keep the Parse as it is
    assert bytes(link.cbuf[st.msg:st.mend]) == BIND
    assert st.cut() == PARSE                            # replace the Bind
    ev = st.client_walk()
    assert ev == impl.EV_HELD | impl.EV_DONE
    assert st.tail == EXEC + SYNC and link.at_server() == b""
    assert st.send == 1 and not st.unsynced


def test_whole_rewrite_message_is_awaited(mk, impl):
    link = mk(tracked=True)
    link.link()
    assert link.client(PARSE[:7]) == impl.EV_DONE
    assert link.step.cend == 7 and link.step.c_skip == 0
    assert link.client(PARSE[7:]) == impl.EV_REWRITE


def test_tracked_server_events(mk, impl):
    link = mk(tracked=True)
    link.link()
    link.client(PARSE + SYNC)          # a Parse: rewrite event, left unchanged
    link.step.client_walk()
    assert link.server(m(b"1")) == impl.EV_ANSWER
    assert link.step.server_walk() == impl.EV_DONE
    assert link.server(m(b"C", b"DISCARD ALL\0") + m(b"C", b"SELECT 1\0") + Z_I) == impl.EV_CC
    assert link.step.server_walk() == impl.EV_RELEASE      # no EV_Z unless asked for
    link.step.want_z = True
    link.client(m(b"Q", b"select 1\0"))
    assert link.server(m(b"C", b"SELECT 1\0") + Z_I) == impl.EV_Z   # the 'C' SELECT is no event
    assert link.step.server_walk() == impl.EV_RELEASE


def test_copy_in_from_an_execute_after_sync(mk, impl):
    link = mk()
    link.link()
    link.client(PARSE + BIND + EXEC + SYNC)
    assert link.step.send == 1
    link.server(m(b"1") + m(b"2") + m(b"G", b"\0\0\0"))
    assert link.step.send == 0 and link.step.in_copy_in
    link.client(m(b"d", b"1\n") + SYNC)                     # ignored by the server
    assert link.step.send == 0
    link.client(m(b"c") + SYNC)
    assert link.step.send == 1 and not link.step.in_copy_in
    assert link.server(m(b"C", b"COPY 1\0") + Z_I) == impl.EV_RELEASE


def test_copy_in_from_a_query_counts(mk, impl):
    link = mk()
    link.link()
    link.client(m(b"Q", b"copy t from stdin\0"))
    link.server(m(b"G", b"\0\0\0"))
    assert link.step.send == 1
    link.client(m(b"d", b"1\n") + m(b"c"))
    assert link.server(m(b"C", b"COPY 1\0") + Z_I) == impl.EV_RELEASE


def test_early_bytes_walk(mk, impl):
    link = mk()
    link.cbuf[:len(Q)] = Q
    link.step.cend = len(Q)
    assert link.step.client_start() == impl.EV_LINK
    link.link()
    assert link.step.client_walk() == impl.EV_DONE
    assert link.at_server() == Q


def test_full_buffer_with_a_large_rewrite_message(mk, impl):
    link = mk(tracked=True, bufsize=64)
    link.link()
    big = m(b"P", b"s\0" + b"x" * 100 + b"\0\0\0")
    assert link.client(big) == impl.EV_DONE
    assert link.step.cend == 64               # full: the relay grows the buffer
    bigger = bytearray(256)
    bigger[:64] = link.cbuf
    link.step.set_cbuf(bigger, memoryview(bigger))
    assert link.step.client_in() == impl.EV_REWRITE
    assert bytes(bigger[link.step.msg:link.step.mend]) == big


def test_flush_stats(mk, impl):
    class S:
        query_count = xact_count = bytes_in = bytes_out = 0
    link = mk()
    link.link()
    link.client(Q)
    link.server(ROWS + Z_I)
    s = S()
    link.step.flush_stats(s)
    assert (s.query_count, s.xact_count, s.bytes_in, s.bytes_out) == (1, 1, len(Q), len(ROWS + Z_I))
    assert link.step.queries == 0


# ----------------------------------------------------------- session statements (sessionstate.py)

SESSION_TEXTS = [
    (b"SET work_mem = '8MB'", True), (b"  \n\treset ALL", True), (b"select 1", False),
    (b"select 1;", False), (b"select 1 ;  ", False), (b"SELECT 1; SET x.y = 1", True),
    (b"/* c */ select 1", True), (b"-- c\nselect 1", True), (b"SELECT pg_advisory_lock(1)", True),
    (b"select set_config('a.b', 'c', false)", True), (b"BEGIN", False), (b"ROLLBACK", False),
    (b"DELETE FROM t", False), (b"DECLARE c CURSOR WITH HOLD FOR SELECT 1", True),
    (b"discard all", True), (b"CREATE TEMP TABLE t (x int)", True), (b"close c", True),
    (b"drop table t", True), (b"listen ch", True), (b"UNLISTEN *", True),
    (b"PREPARE q AS SELECT 1", True), (b"DEALLOCATE q", True), (b"END", False), (b"", False),
    (b"select 'a;b'", True),           # a ';' inside a literal: looked at, harmlessly
]


@pytest.mark.parametrize("text,hit", SESSION_TEXTS)
def test_session_text_is_the_same_in_both_twins(impl, text, hit):
    q = bytearray(b"Qxxxx" + text + b"\0")
    assert impl.session_text(q, 5, len(q), True, False) is hit
    assert impl.session_text(q, 5, len(q), False, False) is True     # not all there: a hit
    p = bytearray(b"Pxxxxs1\0" + text + b"\0\0\x01\0\0\0\x3b")      # an OID byte ';' after it
    assert impl.session_text(p, 5, len(p), True, True) is hit
    assert impl.session_text(p, 5, len(p), False, True) is hit       # its text ends in view


def test_session_statement_is_reported_and_ordinary_ones_are_not(mk, impl):
    link = mk()
    link.link()
    assert link.client(Q) == impl.EV_DONE and not link.step.sess_seen
    s = m(b"Q", b"SET work_mem = 1\0")
    assert link.client(Q + s + Q) == impl.EV_SESSION
    st = link.step
    assert st.sess_hit and bytes(link.cbuf[st.msg:st.mend]) == s
    assert st.client_walk() == impl.EV_DONE
    assert link.at_server() == Q + Q + s + Q and st.send == 4
    assert not st.sess_seen                    # the relay's decision (sessionstate.on_text)
    off = mk(mode=impl.SESSION)                # session pooling looks at nothing
    off.link()
    assert off.client(s) == impl.EV_DONE and not off.step.sess_hit


def test_split_query_is_awaited_whole_in_transaction_mode(mk, impl):
    link = mk()
    link.link()
    big = m(b"Q", b"select " + b"x" * 1000 + b"; set a.b = 1\0")
    assert link.client(big[:100]) == impl.EV_DONE
    assert link.step.cend == 100 and link.at_server() == b"" and link.step.send == 0
    assert link.client(big[100:]) == impl.EV_SESSION           # the ';' far in was seen
    assert link.step.client_walk() == impl.EV_DONE
    assert link.at_server() == big and link.step.send == 1


def test_query_larger_than_the_buffer_counts_as_a_hit(mk, impl):
    link = mk(bufsize=64)
    link.link()
    big = m(b"Q", b"select " + b"x" * 200 + b"\0")
    assert link.client(big[:64]) == impl.EV_SESSION            # cannot be seen whole
    assert link.step.client_walk() == impl.EV_DONE
    assert link.step.c_skip == len(big) - 64

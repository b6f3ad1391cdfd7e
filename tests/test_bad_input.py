"""A client's bad message is refused by the pooler, never forwarded: the client gets
08P01, the server it was using stays in the pool (issue 14, item 5)."""
from __future__ import annotations

import struct

import pytest

from conftest import APP_DB, APP_PASSWORD, APP_USER, backend_count, raw_client, wait_until
from rawpg import bind, error_of, execute, message, parse, query, rows_of

UNKNOWN = message(b"Y", b"junk")
HUGE_QUERY = b"Q" + struct.pack("!i", 0x40000000)      # 1 GiB: PostgreSQL's limit is below
HUGE_SYNC = b"S" + struct.pack("!i", 20000)            # a Sync is at most 10,000 bytes


def _backend_pid(conn) -> int:
    return int(rows_of(conn.exchange(query("SELECT pg_backend_pid()")))[0][0])


@pytest.fixture
def one_server(pooler_factory, pooler_config, app_userlist):
    """Transaction pooling over a single server: every client gets the same backend."""
    return pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=1),
                          app_userlist)


@pytest.mark.parametrize("bad, text", [(UNKNOWN, "unknown pkt"),
                                       (HUGE_QUERY, "invalid message length"),
                                       (HUGE_SYNC, "invalid message length")])
def test_a_refused_message_costs_the_client_not_the_server(pg, one_server, bad, text):
    p = one_server
    c = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    pid = _backend_pid(c)
    c.send(bad)
    err = c.read_error()
    assert err.fields["C"] == "08P01" and text in err.fields["M"], err.fields
    assert err.fields["S"] == "FATAL"
    assert c.at_eof()
    c.close()
    other = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    assert _backend_pid(other) == pid                 # the same server, still pooled
    assert backend_count(pg, APP_DB, APP_USER) == 1
    other.close()
    assert "server conn crashed" not in p.log()


def test_bad_message_after_half_a_batch_settles_the_server(pg, one_server):
    """Parse/Bind/Execute went to the server without a Sync, then junk: the pooler
    ends the batch itself, forwards its answers, and keeps the server."""
    p = one_server
    c = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    pid = _backend_pid(c)
    c.send(parse("", "SELECT 42"), bind(""), execute(), UNKNOWN)
    answers = []
    while True:
        t, body = c.read_msg()
        answers.append((t, body))
        if t == "E":
            break
    assert [t for t, _ in answers][:3] == ["1", "2", "D"]       # the batch's own answers
    assert error_of(answers)["C"] == "08P01"
    c.close()
    other = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    assert _backend_pid(other) == pid
    other.close()


def test_bad_message_inside_a_transaction_rolls_it_back_and_keeps_the_server(pg, one_server):
    p = one_server
    c = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    c.exchange(query("BEGIN"))
    c.exchange(query("CREATE TEMP TABLE t_bad_input (x int)"))
    pid = _backend_pid(c)
    c.send(UNKNOWN)
    assert c.read_error().fields["C"] == "08P01"
    c.close()
    other = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    assert _backend_pid(other) == pid
    # The transaction was rolled back: its temp table is gone, and `other` is not in it.
    answers = other.exchange(query("SELECT count(*) FROM pg_class WHERE relname = 't_bad_input'"))
    assert rows_of(answers) == [["0"]] and other.status == "I"
    other.close()
    wait_until(lambda: backend_count(pg, APP_DB, APP_USER) == 1)

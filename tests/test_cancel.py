"""Query cancellation through the pooler: the driver's cancel API reaches the
right server, the connection stays usable, and a CancelRequest with a wrong
key (or for an idle client) does nothing."""
from __future__ import annotations

import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from conftest import APP_DB, APP_PASSWORD, APP_USER
from rawpg import RawConn, send_cancel


def one(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def cancel_later(conn, delay: float, when: list) -> threading.Thread:
    def run():
        time.sleep(delay)
        when.append(time.monotonic())
        conn.cancel()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_driver_cancel_stops_query_with_57014(mode, pg, pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(pool_mode=mode, default_pool_size=2), app_userlist)
    conn = p.connect()
    conn.autocommit = True
    pid_before = one(conn, "SELECT pg_backend_pid()")
    assert conn.get_backend_pid() != pid_before, "the client must get the pooler's key, not the server's"
    # a bystander's query on another server must not be cancelled
    other = p.connect()
    other.autocommit = True
    other_result: list = []

    def run_other():
        other_result.append(one(other, "SELECT 7 FROM pg_sleep(1.5)"))
    ot = threading.Thread(target=run_other, daemon=True)
    ot.start()

    when: list[float] = []
    t0 = time.monotonic()
    canceller = cancel_later(conn, 0.4, when)
    with pytest.raises(psycopg2.errors.QueryCanceled) as ei:
        one(conn, "SELECT pg_sleep(10)")
    stopped = time.monotonic()
    canceller.join(5)
    assert ei.value.pgcode == "57014"
    assert when, "cancel was never sent"
    assert stopped - when[0] < 1.0, f"query stopped {stopped - when[0]:.2f}s after the cancel"
    assert stopped - t0 < 3
    # The connection is usable afterwards.
    assert one(conn, "SELECT 6 * 7") == 42
    if mode == "session":
        assert one(conn, "SELECT pg_backend_pid()") == pid_before
    ot.join(10)
    assert other_result == [7], "the other client's query was disturbed"
    conn.close()
    other.close()


def test_cancel_with_wrong_key_does_nothing(pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(default_pool_size=2), app_userlist)
    with RawConn(p.host, p.port) as c:
        c.login(APP_USER, APP_PASSWORD, APP_DB)
        pid, key = c.backend_key
        # wrong key, wrong pid, and the right pair while idle: nothing happens
        c.send_query("SELECT pg_sleep(1.2), 'done'")
        time.sleep(0.3)
        send_cancel(p.host, p.port, pid, key ^ 1)
        send_cancel(p.host, p.port, pid ^ 1, key)
        send_cancel(p.host, p.port, 0, 0)
        t0 = time.monotonic()
        rows, err = c.read_result()
        assert err is None, f"query cancelled by a wrong key: {err.fields}"
        assert rows == [["", "done"]]
        assert time.monotonic() - t0 > 0.5
        send_cancel(p.host, p.port, pid, key)         # idle: must not hit a later query
        time.sleep(0.3)
        rows, err = c.query("SELECT pg_sleep(0.5), 1")
        assert err is None and rows == [["", "1"]]
        # Control: the right key does cancel (so the cases above were real).
        c.send_query("SELECT pg_sleep(10)")
        time.sleep(0.3)
        t0 = time.monotonic()
        send_cancel(p.host, p.port, pid, key)
        rows, err = c.read_result()
        assert err is not None and err.sqlstate == "57014", err
        assert time.monotonic() - t0 < 1.0
        rows, err = c.query("SELECT 'still here'")
        assert err is None and rows == [["still here"]]


def test_cancel_key_of_one_client_does_not_cancel_another(pooler_factory, pooler_config,
                                                          app_userlist):
    p = pooler_factory(pooler_config(default_pool_size=2), app_userlist)
    with RawConn(p.host, p.port) as a, RawConn(p.host, p.port) as b:
        a.login(APP_USER, APP_PASSWORD, APP_DB)
        b.login(APP_USER, APP_PASSWORD, APP_DB)
        assert a.backend_key != b.backend_key
        a.send_query("SELECT pg_sleep(1), 'a'")
        b.send_query("SELECT pg_sleep(10), 'b'")
        time.sleep(0.3)
        send_cancel(p.host, p.port, *b.backend_key)
        rows, err = b.read_result()
        assert err is not None and err.sqlstate == "57014"
        rows, err = a.read_result()
        assert err is None and rows == [["", "a"]]


def test_cancel_reaches_the_right_worker_with_several_workers(pooler_factory, pooler_config,
                                                               app_userlist):
    """With workers: 2 a CancelRequest may be accepted by the worker that does not
    own the client; it must still cancel that client's query (and only it)."""
    p = pooler_factory(pooler_config(workers=2, default_pool_size=4), app_userlist)
    for _ in range(4):
        with RawConn(p.host, p.port) as c, RawConn(p.host, p.port) as other:
            c.login(APP_USER, APP_PASSWORD, APP_DB)
            other.login(APP_USER, APP_PASSWORD, APP_DB)
            other.send_query("SELECT pg_sleep(0.6), 'other'")
            c.send_query("SELECT pg_sleep(10)")
            time.sleep(0.2)
            t0 = time.monotonic()
            send_cancel(p.host, p.port, *c.backend_key)
            rows, err = c.read_result()
            assert err is not None and err.sqlstate == "57014", err
            assert time.monotonic() - t0 < 1.0
            rows, err = other.read_result()
            assert err is None and rows == [["", "other"]]

"""Timeouts: each one fires with PgBouncer's wording and a sensible SQLSTATE,
leaves no dirty server behind, and the pooler goes on serving everyone else.

PgBouncer's texts (janitor.c / objects.c): "query_wait_timeout", "query timeout",
"idle transaction timeout", "client_idle_timeout", "client_login_timeout",
"server login has been failing, try again later (server_login_retry)".
"""
from __future__ import annotations

import contextlib
import socket
import struct
import time

import psycopg2
import pytest

from conftest import wait_until
from test_protocol_patterns import LoginError, Q, Wire, fields


@contextlib.contextmanager
def superuser(pg):
    conn = psycopg2.connect(pg.unix_dsn("postgres", "postgres"))
    conn.autocommit = True
    try:
        yield conn.cursor()
    finally:
        conn.close()


def activity(pg, where: str, params=()) -> list[tuple]:
    with superuser(pg) as cur:
        cur.execute("SELECT pid, state, query FROM pg_stat_activity WHERE datname = 'app' "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND " + where,
                    params)
        return cur.fetchall()


def start(pooler_factory, pooler_config, app_userlist, **overrides):
    cfg = pooler_config(**{"pool_mode": "transaction", "auth": {"type": "trust"}, **overrides})
    return pooler_factory(cfg, app_userlist)


def fatal_of(w: Wire, timeout: float) -> dict[str, str]:
    """Read until the pooler sends an ErrorResponse and closes; return its fields."""
    w.sock.settimeout(timeout)
    err = None
    try:
        while True:
            t, b = w.read()
            if t == "E":
                err = fields(b)
    except ConnectionError:
        pass
    assert err is not None, "the connection closed without an error message"
    return err


def ok(p, sql="SELECT 1") -> list:
    """A fresh client gets an answer: the pooler is still serving."""
    w = Wire(p.port)
    try:
        return w.query(sql)
    finally:
        w.close()


# ----------------------------------------------------------------------------- query_wait_timeout

@pytest.mark.parametrize("where", ["global", "database"])
def test_query_wait_timeout(pg, pooler_factory, pooler_config, app_userlist, where):
    """Globally, or on the database entry over a longer global one (PgBouncer 1.24)."""
    if where == "global":
        p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
                  query_wait_timeout=1)
    else:
        dbs = pooler_config()["databases"]
        dbs["app"]["query_wait_timeout"] = 1
        p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
                  query_wait_timeout=120, databases=dbs)
    holder = Wire(p.port)
    holder.query("BEGIN")                    # holds the only server
    waiter = Wire(p.port)
    t0 = time.monotonic()
    waiter.send(Q("SELECT 'never'"))
    err = fatal_of(waiter, 10)
    waited = time.monotonic() - t0
    assert err["M"] == "query_wait_timeout"
    assert err["C"] == "08P01" and err["S"] == "FATAL"
    assert 0.9 < waited < 3.5, waited
    # The holder is unaffected, and once it is done the pool serves again.
    assert holder.query("SELECT 'still here'") == [["still here"]]
    holder.query("COMMIT")
    assert ok(p) == [["1"]]
    holder.close()


# ----------------------------------------------------------------------------- query_timeout

@pytest.mark.parametrize("recovery_timeout", [5, 0])
def test_query_timeout_cancels_the_query(pg, pooler_factory, pooler_config, app_userlist,
                                         recovery_timeout):
    """The client gets 57014 and goes; the query is cancelled on the server. With
    recovery (the default) the backend is then recovered and reused, clean; with
    recovery_timeout 0 it is closed, as PgBouncer does."""
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=1, query_timeout=1,
              recovery_timeout=recovery_timeout)
    w = Wire(p.port)
    (pid,) = w.query("SELECT pg_backend_pid()")[0]
    t0 = time.monotonic()
    w.send(Q("SELECT pg_sleep(20) /* qt */"))
    err = fatal_of(w, 10)
    assert time.monotonic() - t0 < 3.5
    assert err["M"] == "query timeout"
    assert err["C"] == "57014"
    # The backend stops sleeping: the pooler cancelled it.
    wait_until(lambda: not activity(pg, "state = 'active' AND query LIKE %s",
                                    ("%pg_sleep(20) /* qt */%",)),
               timeout=5, message="the timed-out query is still running on the server")
    # The next client gets a clean server: the recovered one, or a new one.
    (new_pid, clean) = ok(p, "SELECT pg_backend_pid(), now() = statement_timestamp()")[0]
    assert clean == "t"
    assert (new_pid == pid) == (recovery_timeout > 0), (pid, new_pid)
    # Fast queries are not affected.
    w = Wire(p.port)
    for _ in range(5):
        assert w.query("SELECT pg_sleep(0.3), 7")[0][1] == "7"
    w.close()


# ----------------------------------------------------------------------------- idle_transaction_timeout

def test_idle_transaction_timeout(pg, pooler_factory, pooler_config, app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
              idle_transaction_timeout=1)
    w = Wire(p.port)
    w.query("BEGIN; CREATE TEMP TABLE itt (x int)")
    t0 = time.monotonic()
    err = fatal_of(w, 10)
    assert 0.9 < time.monotonic() - t0 < 3.5
    assert err["M"] == "idle transaction timeout"
    assert err["C"] == "25P03"
    wait_until(lambda: not activity(pg, "state LIKE 'idle in transaction%%'"), timeout=5)
    assert ok(p, "SELECT now() = statement_timestamp(), to_regclass('itt') IS NULL") == [["t", "t"]]
    # Idle *outside* a transaction is not an idle transaction: the client stays.
    w = Wire(p.port)
    w.query("SELECT 1")
    time.sleep(2)
    assert w.query("SELECT 2") == [["2"]]
    # A transaction that keeps working is not idle either.
    w.query("BEGIN")
    for _ in range(6):
        time.sleep(0.3)
        w.query("SELECT 3")
    w.query("COMMIT")
    w.close()


def test_idle_transaction_timeout_spares_idle_session_clients(pg, pooler_factory, pooler_config,
                                                              app_userlist):
    """Session mode links the server for the whole session; a session idle between
    transactions (ReadyForQuery 'I') is not an idle transaction."""
    p = start(pooler_factory, pooler_config, app_userlist, pool_mode="session",
              idle_transaction_timeout=1)
    w = Wire(p.port)
    w.query("SELECT 1")
    time.sleep(2.2)
    assert w.query("SELECT 'alive'") == [["alive"]]
    w.query("BEGIN")
    err = fatal_of(w, 10)
    assert err["M"] == "idle transaction timeout"


# ----------------------------------------------------------------------------- transaction_timeout

def test_transaction_timeout_closes_a_busy_transaction(pg, pooler_factory, pooler_config,
                                                       app_userlist):
    """PgBouncer 1.25: a transaction older than transaction_timeout is ended by closing
    its client, however busy it keeps (idle_transaction_timeout would spare it); a long
    single statement counts too; a client idle between transactions stays."""
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
              transaction_timeout=1)
    w = Wire(p.port)
    w.query("BEGIN; CREATE TEMP TABLE ttt (x int)")
    t0 = time.monotonic()
    with pytest.raises((AssertionError, ConnectionError, OSError)):
        for _ in range(40):                  # busy: a statement every 0.2 s
            w.query("SELECT 1")
            time.sleep(0.2)
    assert 0.9 < time.monotonic() - t0 < 4
    wait_until(lambda: not activity(pg, "state LIKE 'idle in transaction%%'"), timeout=5)
    assert ok(p, "SELECT to_regclass('ttt') IS NULL") == [["t"]]      # rolled back, clean
    # One long statement outside a block is a transaction of its own.
    w = Wire(p.port)
    w.send(Q("SELECT pg_sleep(5)"))
    err = fatal_of(w, 10)
    assert (err["C"], err["M"]) == ("25P04", "transaction timeout")
    # Idle between transactions is not in a transaction: the client stays.
    w = Wire(p.port)
    w.query("SELECT 1")
    time.sleep(1.6)
    assert w.query("SELECT 2") == [["2"]]
    w.close()


def test_transaction_timeout_counts_each_session_transaction_from_its_start(
        pg, pooler_factory, pooler_config, app_userlist):
    """Session pooling links the server for the whole session: the timeout counts from
    each transaction's first statement, not from the login."""
    p = start(pooler_factory, pooler_config, app_userlist, pool_mode="session",
              transaction_timeout=1.5)
    w = Wire(p.port)
    w.query("SELECT 1")
    time.sleep(2)                            # the session is older than the timeout
    w.query("BEGIN")
    time.sleep(0.9)                          # janitor rounds (0.5 s) pass meanwhile
    assert w.query("SELECT 'young'") == [["young"]]
    w.query("COMMIT")
    time.sleep(1)                            # the last transaction's age must not carry
    w.query("BEGIN")
    assert w.query("SELECT 'next'") == [["next"]]
    err = fatal_of(w, 10)
    assert (err["C"], err["M"]) == ("25P04", "transaction timeout")


def test_transaction_timeout_of_a_user_overrides_the_global(pg, pooler_factory, pooler_config,
                                                            app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, transaction_timeout=0,
              users={"app": {"transaction_timeout": 1}})
    w = Wire(p.port)
    w.query("BEGIN")
    err = fatal_of(w, 10)
    assert (err["C"], err["M"]) == ("25P04", "transaction timeout")


# ----------------------------------------------------------------------------- query_wait_notify

def test_query_wait_notify_tells_a_queued_client_once(pg, pooler_factory, pooler_config,
                                                      app_userlist):
    """PgBouncer 1.25: a client queued longer than query_wait_notify gets one NOTICE,
    then its answer when a server frees up."""
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
              query_wait_notify=0.5)
    holder = Wire(p.port)
    holder.query("BEGIN")                    # holds the only server
    waiter = Wire(p.port)
    waiter.send(Q("SELECT 'served'"))
    time.sleep(2.5)                          # several janitor rounds past the bound
    holder.query("COMMIT")
    msgs = []
    while True:
        t, b = waiter.read()
        msgs.append((t, b))
        if t == "Z":
            break
    notices = [fields(b) for t, b in msgs if t == "N"]
    assert [(n["S"], n["C"], n["M"]) for n in notices] == [
        ("NOTICE", "00000",
         "No server connection available in postgres backend, client being queued")]
    assert msgs[0][0] == "N" and [t for t, _ in msgs[1:]] == ["T", "D", "C", "Z"]
    # A client that did not wait that long hears nothing.
    assert waiter.query("SELECT 1") == [["1"]]
    holder.close()
    waiter.close()


# ----------------------------------------------------------------------------- client_idle_timeout

def test_client_idle_timeout(pg, pooler_factory, pooler_config, app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, client_idle_timeout=1)
    idle = Wire(p.port)
    idle.query("SELECT 1")
    busy = Wire(p.port)
    t0 = time.monotonic()
    err = None
    while time.monotonic() - t0 < 3:
        assert busy.query("SELECT 1") == [["1"]]      # keeps busy alive
        time.sleep(0.2)
    err = fatal_of(idle, 5)
    assert err["M"] == "client_idle_timeout"
    assert err["C"] == "57P05"
    assert busy.query("SELECT 'busy survives'") == [["busy survives"]]
    busy.close()


# ----------------------------------------------------------------------------- client_login_timeout

def test_client_login_timeout(pg, pooler_factory, pooler_config, app_userlist):
    # Password auth here, so a client can also stall half-way through the login.
    p = pooler_factory(pooler_config(pool_mode="transaction", client_login_timeout=1), app_userlist)
    silent = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    stalled = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    body = struct.pack("!i", 196608) + b"user\0app\0database\0app\0\0"
    stalled.sendall(struct.pack("!i", len(body) + 4) + body)
    assert stalled.recv(1) == b"R"          # asked for a password, which never comes
    t0 = time.monotonic()

    def drain(s: socket.socket) -> bytes:
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk

    # Meanwhile a well-behaved client logs in and works.
    conn = psycopg2.connect(p.dsn(), connect_timeout=5)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    data_silent = drain(silent)
    data_stalled = drain(stalled)
    assert time.monotonic() - t0 < 4
    assert b"client_login_timeout" in data_silent
    assert b"client_login_timeout" in data_stalled
    assert b"C08P01\0" in data_stalled
    # The logged-in client is not subject to the login timeout.
    time.sleep(0.5)
    with conn.cursor() as cur:
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
    conn.close()


# ----------------------------------------------------------------------------- server connect / login retry

def test_server_unreachable_fails_cleanly_then_fast_within_login_retry(
        pg, pooler_factory, pooler_config, app_userlist):
    from pooler.dev.devcluster import free_port
    closed_port = free_port()
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)                        # accepts TCP, never speaks
    cfg = pooler_config(pool_mode="transaction", auth={"type": "trust"},
                        server_login_retry=2, server_connect_timeout=1)
    cfg["databases"]["deaddb"] = {"host": "127.0.0.1", "port": closed_port, "dbname": "app"}
    cfg["databases"]["slowdb"] = {"host": "127.0.0.1", "port": blackhole.getsockname()[1],
                                  "dbname": "app"}
    p = pooler_factory(cfg, app_userlist)
    try:
        def attempt(db: str) -> tuple[dict, float]:
            t0 = time.monotonic()
            try:
                w = Wire(p.port, database=db)
            except LoginError as e:
                return e.fields, time.monotonic() - t0
            w.send(Q("SELECT 1"))
            return fatal_of(w, 10), time.monotonic() - t0

        err, took = attempt("deaddb")
        assert err["C"].startswith("08"), err
        assert str(closed_port) in err["M"] and "refused" in err["M"].lower(), err
        assert took < 2
        err2, took2 = attempt("deaddb")
        assert took2 < 0.5
        assert err2["M"].startswith(
            "server login has been failing, try again later (server_login_retry)"), err2
        assert err2["C"].startswith("08")
        # Other databases are served meanwhile.
        assert ok(p) == [["1"]]
        # After server_login_retry the pooler tries the server again.
        time.sleep(2.2)
        err3, _ = attempt("deaddb")
        assert "refused" in err3["M"].lower(), err3

        # A server that accepts TCP but never answers: server_connect_timeout.
        err4, took4 = attempt("slowdb")
        assert 0.9 < took4 < 3, took4
        assert err4["C"].startswith("08") and "timeout" in err4["M"], err4
        assert ok(p) == [["1"]]
    finally:
        blackhole.close()


# ----------------------------------------------------------------------------- server_check_*

@pytest.mark.parametrize("delay", [0, 0.3])
def test_server_check_query_replaces_a_server_that_died_idle(pg, pooler_factory, pooler_config,
                                                             app_userlist, delay):
    """server_check_delay: how long a released server is reused without running
    server_check_query first; 0 means always check (PgBouncer)."""
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
              server_check_delay=delay, server_check_query="select 1")
    w = Wire(p.port)
    (pid,) = w.query("SELECT pg_backend_pid()")[0]
    with superuser(pg) as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (int(pid),))
    wait_until(lambda: not activity(pg, "pid = %s", (int(pid),)), timeout=5)
    time.sleep(delay + 0.2)
    (new_pid,) = w.query("SELECT pg_backend_pid()")[0]
    assert new_pid != pid
    assert ok(p) == [["1"]]
    w.close()

"""A pooled server that PostgreSQL closes while it sits idle is dropped at once,
never handed to the next client (issue 14, item 1)."""
from __future__ import annotations

import os
import signal
import threading
import time

import psycopg2
import pytest

from conftest import (APP_DB, APP_PASSWORD, APP_USER, backend_count, raw_client,
                      superuser_conn, wait_until)
from pooler.dev.devcluster import TempPostgres
from rawpg import bind, describe, error_fields, execute, message, parse, query, rows_of

N = 5


def _park_idle_servers(p, n: int) -> list:
    """n clients each open a transaction at once (n servers), then commit: n idle servers."""
    conns = [p.connect() for _ in range(n)]
    for c in conns:
        with c.cursor() as cur:
            cur.execute("SELECT 1")          # BEGIN; SELECT 1: the server stays linked
    for c in conns:
        c.commit()
    return conns


def _terminate_app_backends(pg) -> int:
    with superuser_conn(pg) as su, su.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND usename = %s AND pid <> pg_backend_pid()",
                    (APP_DB, APP_USER))
        return cur.fetchone()[0]


def test_idle_servers_terminated_by_postgres_are_dropped_not_handed_out(
        pg, pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=N), app_userlist)
    conns = _park_idle_servers(p, N)
    wait_until(lambda: backend_count(pg, APP_DB, APP_USER) == N)
    assert _terminate_app_backends(pg) == N
    # PostgreSQL says FATAL 57P01 and closes; the pooler notices without any client.
    wait_until(lambda: p.log().count("server sent FATAL 57P01 while idle") == N,
               message="the pooler did not notice its idle servers die")
    # Every client's next transaction works, on a new server.
    for c in conns:
        with c.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchone()[0] > 0
        c.commit()
    assert "server conn crashed" not in p.log()
    for c in conns:
        c.close()


def test_a_server_closed_while_idle_frees_its_slot_for_a_waiting_client(
        pg, pooler_factory, pooler_config, app_userlist):
    """pool_size 1: the only server dies idle; a client gets a fresh one, not an error."""
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=1), app_userlist)
    first = p.connect()
    first.autocommit = True
    with first.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        old_pid = cur.fetchone()[0]
    assert _terminate_app_backends(pg) == 1
    wait_until(lambda: "while idle" in p.log())
    second = p.connect()
    second.autocommit = True
    with second.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] != old_pid
    with first.cursor() as cur:
        cur.execute("SELECT 1")
    for c in (first, second):
        c.close()


def _terminate_soon(pg, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        _terminate_app_backends(pg)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_server_lost_mid_query_costs_the_transaction_not_the_connection(
        pg, pooler_factory, pooler_config, app_userlist):
    """Transaction pooling: the backend dies during a statement. The client gets an
    error with a SQLSTATE, keeps its connection, and its next statement works."""
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2), app_userlist)
    conn = p.connect()
    conn.autocommit = True
    killer = _terminate_soon(pg, 0.5)
    with conn.cursor() as cur:
        with pytest.raises(psycopg2.Error) as err:
            cur.execute("SELECT pg_sleep(10)")
    killer.join()
    assert err.value.pgcode in ("57P01", "08007"), err.value.pgerror
    assert conn.closed == 0
    with conn.cursor() as cur:
        cur.execute("SELECT 41 + 1")
        assert cur.fetchone()[0] == 42
    conn.close()


def test_a_server_lost_in_a_transaction_block_fails_the_block_until_rollback(
        pg, pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2), app_userlist)
    conn = p.connect()                      # psycopg2: BEGIN before the first statement
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert _terminate_app_backends(pg) == 1
        wait_until(lambda: "server conn crashed?" in p.log())
        with pytest.raises(psycopg2.Error) as err:
            cur.execute("SELECT 2")
        assert err.value.pgcode in ("57P01", "08006"), err.value.pgerror
        with pytest.raises(psycopg2.Error) as err:
            cur.execute("SELECT 3")          # still in the failed block
        assert err.value.pgcode == "25P02"
    conn.rollback()                          # answered by the pooler
    assert conn.closed == 0
    with conn.cursor() as cur:
        cur.execute("SELECT 4")
        assert cur.fetchone()[0] == 4
    conn.commit()
    conn.close()


def test_commit_of_a_failed_block_reports_rollback(pg, pooler_factory, pooler_config,
                                                   app_userlist):
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2), app_userlist)
    c = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    c.exchange(query("BEGIN"))
    c.exchange(query("SELECT 1"))
    assert _terminate_app_backends(pg) == 1
    wait_until(lambda: "server conn crashed?" in p.log())
    answers = c.exchange(query("SELECT 2"))
    codes = [error_fields(body)["C"] for t, body in answers if t == "E"]
    # PostgreSQL's own FATAL came first (passed through as it was sent), then ours.
    assert codes == ["57P01", "08006"] and c.status == "E"
    answers = c.exchange(query("COMMIT"))
    assert ("C", b"ROLLBACK\0") in answers and c.status == "I"
    assert rows_of(c.exchange(query("SELECT 5"))) == [["5"]]
    c.close()


def test_server_loss_closes_client_restores_pgbouncers_behaviour(
        pg, pooler_factory, pooler_config, app_userlist):
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2,
                                     server_loss_closes_client=True), app_userlist)
    conn = p.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert _terminate_app_backends(pg) == 1
        wait_until(lambda: "server conn crashed?" in p.log())
        with pytest.raises(psycopg2.Error):
            cur.execute("SELECT 2")
    assert conn.closed != 0


def test_a_failed_block_over_the_extended_protocol(pg, pooler_factory, pooler_config,
                                                   app_userlist):
    """Drivers that ROLLBACK with Parse/Bind/Execute/Sync (pgjdbc, asyncpg) get their
    answers from the pooler too."""
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2), app_userlist)
    c = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    c.exchange(query("BEGIN"))
    assert _terminate_app_backends(pg) == 1
    wait_until(lambda: "server conn crashed?" in p.log())
    answers = c.exchange(parse("", "SELECT 1") + bind("") + execute() + message(b"S"))
    codes = [error_fields(body)["C"] for t, body in answers if t == "E"]
    assert codes[-1] == "08006" and c.status == "E"
    answers = c.exchange(parse("", "ROLLBACK") + bind("") + describe("P", "") + execute() + message(b"S"))
    assert [t for t, _ in answers] == ["1", "2", "n", "C", "Z"] and c.status == "I"
    assert rows_of(c.exchange(query("SELECT 6"))) == [["6"]]
    c.close()


@pytest.fixture
def own_pg():
    """A cluster of this test's own: restarting the shared one would cut the other
    tests' cached connections to it."""
    cluster = TempPostgres().start()
    try:
        cluster.create_role(APP_USER, APP_PASSWORD)
        cluster.create_database(APP_DB, owner=APP_USER)
        yield cluster
    finally:
        cluster.stop()


def test_clients_wait_out_a_postgres_restart(own_pg, pooler_factory, app_userlist):
    """PostgreSQL is down for a while: clients whose transactions start meanwhile wait
    (one login attempt per server_login_retry) and are served once it is back."""
    pg = own_pg
    cfg = {"databases": {APP_DB: {"host": pg.host, "port": pg.port, "dbname": APP_DB}},
           "pool_mode": "transaction", "default_pool_size": 3, "server_login_retry": 0.3}
    p = pooler_factory(cfg, app_userlist)
    conns = [p.connect() for _ in range(6)]
    for c in conns:
        c.autocommit = True
        with c.cursor() as cur:
            cur.execute("SELECT 1")
    restarter = threading.Thread(target=pg.restart, kwargs={"mode": "fast", "down_for": 2.0})
    restarter.start()
    wait_until(lambda: "while idle" in p.log() or "server conn crashed" in p.log(), timeout=20)
    time.sleep(0.5)                           # PostgreSQL is down now
    results: list = []

    def query(c) -> None:
        try:
            with c.cursor() as cur:
                cur.execute("SELECT 7")
                results.append(cur.fetchone()[0])
        except psycopg2.Error as exc:
            results.append(f"{exc.pgcode}: {exc}")
    threads = [threading.Thread(target=query, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    restarter.join(60)
    assert results == [7] * len(conns), results
    attempts = p.log().count("server login failed")
    assert 1 <= attempts <= 2.0 / 0.3 + 4, attempts      # paced, not one per client per retry
    for c in conns:
        c.close()


def test_commit_after_an_unreported_loss_fails(pg, pooler_factory, pooler_config, app_userlist):
    """The server dies while the client sits in its block (nothing owed, so nothing was
    said yet): the COMMIT must fail with the loss, not report ROLLBACK, which drivers
    take for a commit (psycopg2's commit() does not read the tag)."""
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2), app_userlist)
    conn = p.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")              # BEGIN; SELECT 1: in the block, idle
    assert _terminate_app_backends(pg) == 1
    wait_until(lambda: "server conn crashed?" in p.log())
    with pytest.raises(psycopg2.Error) as err:
        conn.commit()
    assert err.value.pgcode == "08006", err.value.pgerror
    assert conn.closed == 0
    with conn.cursor() as cur:               # the block is over: a new one works
        cur.execute("SELECT 8")
        assert cur.fetchone()[0] == 8
    conn.commit()
    conn.close()


def test_begin_after_a_reported_loss_starts_a_new_block(pg, pooler_factory, pooler_config,
                                                        app_userlist):
    """A client told of the loss that sends BEGIN holds its block ended (what drivers
    hold after their COMMIT failed): the failed block ends and the BEGIN is served."""
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2), app_userlist)
    c = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    c.exchange(query("BEGIN"))
    killer = _terminate_soon(pg, 0.5)
    answers = c.exchange(query("SELECT pg_sleep(10)"))
    killer.join()
    # The request was in flight: it may have taken effect, so not "rolled back".
    assert "08007" in [error_fields(body)["C"] for t, body in answers if t == "E"]
    assert c.status == "E"
    answers = c.exchange(query("BEGIN"))
    assert ("C", b"BEGIN\0") in answers and c.status == "T"
    assert rows_of(c.exchange(query("SELECT 9"))) == [["9"]]
    c.exchange(query("COMMIT"))
    assert c.status == "I"
    c.close()


# -- a request that never reached a dead server goes to another (issue 14.2) ---------

def _one_server_pooler(pooler_factory, pg, app_userlist, host: str, env=None):
    cfg = {"databases": {APP_DB: {"host": host, "port": pg.port, "dbname": APP_DB}},
           "pool_mode": "transaction", "default_pool_size": 1}
    return pooler_factory(cfg, app_userlist, env=env)


def _pid_through(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def test_a_server_dying_as_a_request_arrives_is_not_handed_out(pg, pooler_factory,
                                                               app_userlist):
    """The backend's FATAL/EOF and the client's request reach the pooler in the same
    loop iteration (the pooler is stopped while both arrive): the idle watch runs
    first (server watchers have the higher libev priority), so the request goes to
    a new server and the client sees no error."""
    p = _one_server_pooler(pooler_factory, pg, app_userlist, pg.host)
    conn = p.connect()
    conn.autocommit = True
    old = _pid_through(conn)
    os.kill(p.pid, signal.SIGSTOP)
    try:
        assert _terminate_app_backends(pg) == 1
        wait_until(lambda: backend_count(pg, APP_DB, APP_USER) == 0)
        result: list = []
        t = threading.Thread(target=lambda: result.append(_pid_through(conn)), daemon=True)
        t.start()
        time.sleep(0.3)                      # the request is in the pooler's socket now
    finally:
        os.kill(p.pid, signal.SIGCONT)
    t.join(20)
    assert result and result[0] not in (0, old), (result, p.log()[-2000:])
    assert "while idle" in p.log() and "server conn crashed" not in p.log()
    conn.close()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_request_whose_first_send_fails_goes_to_another_server(pg, pooler_factory,
                                                                 app_userlist):
    """The idle watch is off (fault injection) and the server is reached over a Unix
    socket, where a send to a closed peer fails at once (EPIPE): nothing of the
    request reached PostgreSQL, so the pooler sends it to a new server."""
    p = _one_server_pooler(pooler_factory, pg, app_userlist, pg.socket_dir,
                           env={"POOLER_FAULT_NO_IDLE_WATCH": "1"})
    conn = p.connect()
    conn.autocommit = True
    old = _pid_through(conn)
    assert _terminate_app_backends(pg) == 1
    wait_until(lambda: backend_count(pg, APP_DB, APP_USER) == 0)
    # pg_stat_activity can drop the backend before its process has exited (and closed
    # the socket): then the send would still succeed and the FATAL be read instead.
    wait_until(lambda: not _process_alive(old), message=f"backend {old} never exited")
    assert _pid_through(conn) not in (0, old)
    log = p.log()
    assert "server closed before the request reached it" in log, log[-2000:]
    assert "server conn crashed" not in log
    conn.close()


def test_a_request_in_flight_at_the_loss_is_reported_in_doubt(pg, pooler_factory,
                                                              pooler_config, app_userlist):
    """Outside a block the dead server may have committed the request before dying
    (an immediate shutdown after the commit record): the client gets 08007
    (transaction_resolution_unknown), never 08006's "rolled back"."""
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2), app_userlist)
    c = raw_client(p.port, APP_USER, APP_DB, APP_PASSWORD)
    killer = _terminate_soon(pg, 0.5)
    answers = c.exchange(query("SELECT pg_sleep(10)"))
    killer.join()
    codes = [error_fields(body)["C"] for t, body in answers if t == "E"]
    assert codes[-1] == "08007" and "08006" not in codes and c.status == "I", codes
    assert rows_of(c.exchange(query("SELECT 10"))) == [["10"]]
    c.close()

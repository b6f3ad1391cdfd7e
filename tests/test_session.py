"""Session pooling against the real PostgreSQL: many clients through a small
pool, pgbench, no session state leaking between clients, server_reset_query,
server_lifetime / server_idle_timeout, and clients vanishing mid-query.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time

import psycopg2
import psycopg2.extensions

from conftest import (APP_DB, APP_PASSWORD, APP_USER, Poller, app_direct, backend_count,
                      superuser_conn, wait_until)
from rawpg import RawConn


def direct_sql(pg, sql, params=None):
    with app_direct(pg) as c, c.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else None


def session_pooler(pooler_factory, pooler_config, app_userlist, **overrides):
    return pooler_factory(pooler_config(pool_mode="session", **overrides), app_userlist)


def server_pids(pg) -> set[int]:
    with superuser_conn(pg) as c, c.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND datname = %s AND usename = %s AND pid <> pg_backend_pid()",
                    (APP_DB, APP_USER))
        return {r[0] for r in cur.fetchall()}


def one(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


# ------------------------------------------------------------- many clients, few servers

CLIENTS, INCREMENTS, POOL_SIZE = 50, 100, 5


def test_50_clients_through_pool_of_5_exact_counters(pg, pooler_factory, pooler_config,
                                                     app_userlist):
    direct_sql(pg, "DROP TABLE IF EXISTS sess_counters; "
                   "CREATE TABLE sess_counters (id int PRIMARY KEY, n int NOT NULL); "
                   f"INSERT INTO sess_counters SELECT g, 0 FROM generate_series(0, {CLIENTS}) g")
    p = session_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=POOL_SIZE,
                       max_client_conn=CLIENTS + 10)
    errors: list[BaseException] = []
    sticky: list[bool] = []
    start = threading.Barrier(CLIENTS, timeout=30)

    def client(i: int) -> None:
        try:
            conn = p.connect(connect_timeout=30)
            try:
                start.wait()
                first_pid = one(conn, "SELECT pg_backend_pid()")
                conn.commit()
                with conn.cursor() as cur:
                    for _ in range(INCREMENTS):
                        cur.execute("UPDATE sess_counters SET n = n + 1 WHERE id = %s", (i,))
                        cur.execute("UPDATE sess_counters SET n = n + 1 WHERE id = 0")
                        conn.commit()
                sticky.append(one(conn, "SELECT pg_backend_pid()") == first_pid)
                conn.commit()
            finally:
                conn.close()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(1, CLIENTS + 1)]
    with Poller(lambda: backend_count(pg, APP_DB, APP_USER)) as servers:
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    assert not any(t.is_alive() for t in threads), "clients still running after 90 s"
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}\n{p.log()[-3000:]}"
    rows = dict(direct_sql(pg, "SELECT id, n FROM sess_counters"))
    assert rows[0] == CLIENTS * INCREMENTS
    assert all(rows[i] == INCREMENTS for i in range(1, CLIENTS + 1)), \
        {i: n for i, n in rows.items() if i and n != INCREMENTS}
    assert sticky == [True] * CLIENTS, "a session-mode client changed servers mid-session"
    assert servers.max <= POOL_SIZE, f"backend saw {servers.max} server connections"
    assert servers.max == POOL_SIZE, f"only {servers.max} servers used for 50 clients"


def test_pgbench_init_and_run_through_the_pooler(pg, pooler_factory, pooler_config, app_userlist):
    pgbench = shutil.which("pgbench")
    assert pgbench, "pgbench not installed"
    p = session_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=POOL_SIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=APP_PASSWORD, PGCONNECT_TIMEOUT="10")
    base = [pgbench, "-h", p.host, "-p", str(p.port), "-U", APP_USER]
    cp = subprocess.run(base + ["-i", "-s", "1", "-q", APP_DB], capture_output=True, text=True,
                        env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"pgbench -i failed:\n{cp.stdout}{cp.stderr}\n{p.log()[-3000:]}"
    assert direct_sql(pg, "SELECT count(*) FROM pgbench_accounts") == [(100000,)]
    with Poller(lambda: backend_count(pg, APP_DB, APP_USER)) as servers:
        cp = subprocess.run(base + ["-T", "2", "-c", "4", "-j", "2", APP_DB], capture_output=True,
                            text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, f"pgbench failed:\n{out}\n{p.log()[-3000:]}"
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    assert processed > 20, out
    m = re.search(r"number of failed transactions: (\d+)", out)
    assert m is None or m.group(1) == "0", out
    assert servers.max <= POOL_SIZE
    history = direct_sql(pg, "SELECT count(*) FROM pgbench_history")[0][0]
    assert history == processed, "every transaction pgbench counted must be in the database"


# ----------------------------------------------------------------- session state

def test_session_state_does_not_leak_to_the_next_client(pg, pooler_factory, pooler_config,
                                                        app_userlist):
    with app_direct(pg) as d:
        defaults = {k: one(d, f"SHOW {k}") for k in ("work_mem", "search_path", "statement_timeout")}
    p = session_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1)

    a = p.connect()
    a.autocommit = True
    pid_a = one(a, "SELECT pg_backend_pid()")
    with a.cursor() as cur:
        cur.execute("SET work_mem = '7MB'")
        cur.execute("SET search_path = leaky_schema, public")
        cur.execute("SET statement_timeout = '123s'")
        cur.execute("CREATE TEMP TABLE leaky_tmp (x int)")
        cur.execute("SELECT pg_advisory_lock(424242)")
        cur.execute("PREPARE leaky_stmt AS SELECT 1")
        cur.execute("LISTEN leaky_channel")
        cur.execute("DECLARE leaky_cur CURSOR WITH HOLD FOR SELECT 1")
    assert one(a, "SHOW work_mem") == "7MB"
    assert one(a, "SELECT count(*) FROM pg_prepared_statements") == 1
    a.close()

    b = p.connect()
    b.autocommit = True
    assert one(b, "SELECT pg_backend_pid()") == pid_a, "pool_size 1: must be the same server"
    for k, v in defaults.items():
        assert one(b, f"SHOW {k}") == v, f"{k} leaked from the previous client"
    assert one(b, "SELECT to_regclass('leaky_tmp') IS NULL"), "temp table leaked"
    assert one(b, "SELECT count(*) FROM pg_prepared_statements") == 0, "prepared statement leaked"
    assert one(b, "SELECT count(*) FROM pg_listening_channels()") == 0, "LISTEN leaked"
    assert one(b, "SELECT count(*) FROM pg_cursors") == 0, "cursor leaked"
    assert one(b, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                  "AND pid = pg_backend_pid()") == 0, "advisory lock leaked"
    with app_direct(pg) as d:
        assert one(d, "SELECT pg_try_advisory_lock(424242)"), "advisory lock still held"
        one(d, "SELECT pg_advisory_unlock(424242)")
    b.close()


def test_server_reset_query_runs_once_per_session_release(pg, pooler_factory, pooler_config,
                                                          app_userlist):
    direct_sql(pg, "DROP TABLE IF EXISTS sess_reset_log; "
                   "CREATE TABLE sess_reset_log (pid int NOT NULL DEFAULT pg_backend_pid())")
    p = session_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
                       server_reset_query="INSERT INTO sess_reset_log DEFAULT VALUES")
    pids = set()
    for n in range(1, 4):
        conn = p.connect()
        conn.autocommit = True
        pids.add(one(conn, "SELECT pg_backend_pid()"))
        for _ in range(5):
            one(conn, "SELECT 1")
        assert one(conn, "SELECT count(*) FROM sess_reset_log") == n - 1, \
            "the reset query must run only when the client leaves"
        conn.close()
        wait_until(lambda: direct_sql(pg, "SELECT count(*) FROM sess_reset_log")[0][0] == n, 5,
                   message=f"server_reset_query did not run after client {n}")
    assert len(pids) == 1
    assert {r[0] for r in direct_sql(pg, "SELECT pid FROM sess_reset_log")} == pids


def test_empty_server_reset_query_keeps_session_state(pg, pooler_factory, pooler_config,
                                                      app_userlist):
    """With server_reset_query '' nothing resets the server (as PgBouncer): proof
    that it is the reset query that cleans up in the default configuration."""
    p = session_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1,
                       server_reset_query="")
    a = p.connect()
    a.autocommit = True
    pid = one(a, "SELECT pg_backend_pid()")
    one(a, "SELECT set_config('work_mem', '9MB', false)")
    a.close()
    b = p.connect()
    assert one(b, "SELECT pg_backend_pid()") == pid
    assert one(b, "SHOW work_mem") == "9MB"
    b.close()


# --------------------------------------------------------- server_lifetime / idle timeout

def test_server_lifetime_closes_old_servers(pg, pooler_factory, pooler_config, app_userlist):
    p = session_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=2,
                       server_lifetime=1, server_idle_timeout=0)
    # In use past its lifetime: not closed under the client.
    a = p.connect()
    pid1 = one(a, "SELECT pg_backend_pid()")
    a.commit()
    time.sleep(1.3)
    assert one(a, "SELECT pg_backend_pid()") == pid1
    a.close()
    # Released when older than server_lifetime: closed at once.
    wait_until(lambda: pid1 not in server_pids(pg), 3, message="expired server not closed")
    # Released young, then left idle: the janitor closes it once it is too old.
    b = p.connect()
    pid2 = one(b, "SELECT pg_backend_pid()")
    b.close()
    assert pid2 != pid1
    t0 = time.monotonic()
    wait_until(lambda: pid2 not in server_pids(pg), 4, message="idle expired server not closed")
    assert time.monotonic() - t0 < 4
    c = p.connect()
    pid3 = one(c, "SELECT pg_backend_pid()")
    c.close()
    assert pid3 not in (pid1, pid2)


def test_server_idle_timeout_closes_idle_servers(pg, pooler_factory, pooler_config, app_userlist):
    p = session_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=2,
                       server_idle_timeout=1, server_lifetime=3600)
    # A server linked to an idle session-mode client is in use, not idle.
    a = p.connect()
    a.autocommit = True
    pid1 = one(a, "SELECT pg_backend_pid()")
    time.sleep(1.6)
    assert one(a, "SELECT pg_backend_pid()") == pid1
    a.close()
    t0 = time.monotonic()
    # Back in the pool it stays a while, then is closed.
    time.sleep(0.3)
    assert pid1 in server_pids(pg), "closed before server_idle_timeout"
    wait_until(lambda: pid1 not in server_pids(pg), 4, message="idle server not closed")
    assert time.monotonic() - t0 >= 0.9
    b = p.connect()
    assert one(b, "SELECT pg_backend_pid()") != pid1
    b.close()


# ----------------------------------------------------------------- vanishing clients

def _assert_clean_working_server(p, pg, defaults, within: float):
    t0 = time.monotonic()
    conn = p.connect()
    assert one(conn, "SELECT 40 + 2") == 42
    assert time.monotonic() - t0 < within, "the next client had to wait for the old query"
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    conn.rollback()
    conn.autocommit = True
    assert one(conn, "SHOW work_mem") == defaults["work_mem"]
    assert one(conn, "SELECT count(*) FROM sess_vanish") == 0, "uncommitted row visible"
    pid = one(conn, "SELECT pg_backend_pid()")
    conn.close()
    return pid


def test_client_vanishing_mid_query_or_transaction_leaves_no_bad_server(pg, pooler_factory,
                                                                        pooler_config, app_userlist):
    direct_sql(pg, "DROP TABLE IF EXISTS sess_vanish; CREATE TABLE sess_vanish (x int)")
    with app_direct(pg) as d:
        defaults = {"work_mem": one(d, "SHOW work_mem")}
    p = session_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1)

    # 1. mid-query: close the socket during pg_sleep
    c = RawConn(p.host, p.port)
    c.login(APP_USER, APP_PASSWORD, APP_DB)
    rows, _ = c.query("SET work_mem = '11MB'; SELECT pg_backend_pid()")
    old_pid = int(rows[0][0])
    c.send_query("SELECT pg_sleep(3)")
    wait_until(lambda: direct_sql(pg, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s "
                                      "AND state = 'active' AND query LIKE '%%pg_sleep%%'",
                                  (old_pid,))[0][0] == 1, 5, message="query never started")
    c.close()
    _assert_clean_working_server(p, pg, defaults, within=2.5)

    # 2. inside a transaction, between statements
    c = RawConn(p.host, p.port)
    c.login(APP_USER, APP_PASSWORD, APP_DB)
    c.query("BEGIN")
    rows, err = c.query("SET LOCAL work_mem = '12MB'; INSERT INTO sess_vanish VALUES (2)")
    assert err is None and c.status == "T"
    c.close()
    _assert_clean_working_server(p, pg, defaults, within=2.5)

    # 3. while a large result streams to it
    c = RawConn(p.host, p.port)
    c.login(APP_USER, APP_PASSWORD, APP_DB)
    c.send_query("SELECT repeat('x', 1000) FROM generate_series(1, 50000)")
    c.read_msg()
    c.close()
    _assert_clean_working_server(p, pg, defaults, within=2.5)

    # The pooler never holds more than pool_size servers once the old ones are gone.
    wait_until(lambda: backend_count(pg, APP_DB, APP_USER) <= 1, 10,
               message="abandoned servers linger in PostgreSQL")
    assert direct_sql(pg, "SELECT count(*) FROM sess_vanish") == [(0,)]

"""Replication connections through the pooler (PgBouncer 1.23+): pg_basebackup,
pg_receivewal, pg_recvlogical and a logical subscription on a second cluster, all
pointed at the pooler; a replication client's server is its own, counts against
pool_size, and is closed as soon as the client leaves.

The publishing cluster of this module runs with wal_level=logical and a
pg_hba `replication` line (the session cluster `pg` has neither).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import psycopg2
import pytest

from conftest import admin_show, wait_until
from pooler.dev.devcluster import TempPostgres
from rawpg import PgError, RawConn

SUPER, SUPER_PW = "postgres", "postgres"
ADMIN, ADMIN_PW = "admin", "adminpass"
DB = "app"
TOOL_TIMEOUT = 120


@pytest.fixture(scope="module")
def pub():
    """The cluster behind the pooler: logical WAL, walsenders, slots, replication logins."""
    cluster = TempPostgres(extra_conf={"wal_level": "logical", "max_wal_senders": 20,
                                       "max_replication_slots": 20},
                           extra_hba=["host replication all 127.0.0.1/32 md5"]).start()
    try:
        cluster.create_database(DB)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def sub():
    """A second throwaway cluster, the logical subscriber."""
    cluster = TempPostgres().start()
    try:
        cluster.create_database(DB)
        yield cluster
    finally:
        cluster.stop()


def start_pooler(pooler_factory, pub, pool_size=10, mode="transaction", **glob):
    # Physical replication clients (pg_basebackup, pg_receivewal) ask for the database
    # "replication", as libpq makes them; the pooler routes by that name (PgBouncer too).
    entry = {"host": pub.host, "port": pub.port, "dbname": DB}
    cfg = {"databases": {DB: entry, "replication": entry},
           "pool_mode": mode, "default_pool_size": pool_size, "admin_users": [ADMIN],
           "auth": {"type": "md5"}, **glob}
    return pooler_factory(cfg, {SUPER: SUPER_PW, ADMIN: ADMIN_PW})


def conninfo(p, **extra) -> str:
    parts = {"host": "127.0.0.1", "port": p.port, "dbname": DB, "user": SUPER,
             "password": SUPER_PW, **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())


def run_tool(pub, *args) -> subprocess.CompletedProcess:
    """One of PostgreSQL's client programs, bounded in time; fails the test on exit != 0."""
    cp = subprocess.run([os.path.join(pub.bindir, args[0]), *args[1:]], capture_output=True,
                        text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"{args[0]} failed ({cp.returncode}):\n{cp.stdout}{cp.stderr}"
    return cp


def sql(cluster, query: str, db: str = DB):
    c = psycopg2.connect(cluster.dsn(db))
    try:
        c.autocommit = True     # CREATE SUBSCRIPTION cannot run in a transaction block
        with c.cursor() as cur:
            cur.execute(query)
            return cur.fetchall() if cur.description else None
    finally:
        c.close()


def walsenders(pub) -> list[tuple]:
    """(pid, application_name, state) of the publisher's walsenders."""
    return sql(pub, "SELECT pid, application_name, state FROM pg_stat_replication", "postgres")


def admin_rows(p, what: str) -> list[dict]:
    return admin_show(p, what, ADMIN, ADMIN_PW)


def repl_conn(p, kind: str = "database", app: str = "rawrepl") -> RawConn:
    conn = RawConn("127.0.0.1", p.port, 20)
    conn.login(SUPER, SUPER_PW, DB, replication=kind, application_name=app)
    return conn


# ------------------------------------------------------------------ the real tools

def test_pg_basebackup_through_pooler(pub, pooler_factory, tmp_path):
    p = start_pooler(pooler_factory, pub)
    target = tmp_path / "backup"
    # -X stream: a second replication connection streams the WAL beside the backup.
    run_tool(pub, "pg_basebackup", "-d", conninfo(p), "-D", str(target), "-Ft", "-X", "stream",
             "-c", "fast", "--no-sync")
    assert (target / "base.tar").stat().st_size > 1_000_000
    assert (target / "pg_wal.tar").exists() and (target / "backup_manifest").exists()
    # Both replication servers left with their clients.
    wait_until(lambda: not walsenders(pub), message="walsenders still connected")
    assert not [s for s in admin_rows(p, "SERVERS") if s["replication"] != "none"]


def test_pg_receivewal_bounded_by_endpos(pub, pooler_factory, tmp_path):
    p = start_pooler(pooler_factory, pub)
    sql(pub, "CREATE TABLE IF NOT EXISTS walgen (v text); "
             "INSERT INTO walgen SELECT repeat('x', 100) FROM generate_series(1, 2000)")
    [(endpos,)] = sql(pub, "SELECT pg_current_wal_flush_lsn()::text")
    target = tmp_path / "wal"
    target.mkdir()
    run_tool(pub, "pg_receivewal", "-d", conninfo(p, application_name="recvwal"),
             "-D", str(target), "--endpos", endpos, "--no-loop", "--no-sync")
    assert any(f.name.endswith(".partial") or len(f.name) == 24 for f in target.iterdir())
    wait_until(lambda: not walsenders(pub), message="walsender still connected")


def test_pg_recvlogical_test_decoding(pub, pooler_factory, tmp_path):
    p = start_pooler(pooler_factory, pub)
    sql(pub, "CREATE TABLE IF NOT EXISTS decoded (id int PRIMARY KEY, v text)")
    dsn = conninfo(p, application_name="recvlogical")
    run_tool(pub, "pg_recvlogical", "-d", dsn, "--slot", "through_pooler", "--create-slot",
             "-P", "test_decoding")
    try:
        sql(pub, "INSERT INTO decoded VALUES (1, 'one'), (2, 'two')")
        out = tmp_path / "decoded.txt"
        # Streams until stopped (--endpos can end it on a keepalive before any data):
        # bounded by the wait, then SIGINT, which pg_recvlogical takes as a clean stop.
        proc = subprocess.Popen([os.path.join(pub.bindir, "pg_recvlogical"), "-d", dsn,
                                 "--slot", "through_pooler", "--start", "-f", str(out), "-F", "0"],
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: out.exists() and "'two'" in out.read_text(), timeout=30,
                       message="decoded changes did not arrive")
            assert [w for w in walsenders(pub) if w[1:] == ("recvlogical", "streaming")]
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 0, proc.stderr.read()
        text = out.read_text()
        assert "table public.decoded: INSERT: id[integer]:1 v[text]:'one'" in text, text
        assert "table public.decoded: INSERT: id[integer]:2 v[text]:'two'" in text, text
        wait_until(lambda: not walsenders(pub), message="walsender outlived pg_recvlogical")
    finally:
        run_tool(pub, "pg_recvlogical", "-d", dsn, "--slot", "through_pooler", "--drop-slot")
    assert not sql(pub, "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'through_pooler'")


def test_logical_subscription_through_pooler(pub, sub, pooler_factory):
    p = start_pooler(pooler_factory, pub)
    sql(pub, "CREATE TABLE items (id int PRIMARY KEY, v text); "
             "INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, 100) g; "
             "CREATE PUBLICATION items_pub FOR TABLE items")
    sql(sub, "CREATE TABLE items (id int PRIMARY KEY, v text)")
    sql(sub, f"CREATE SUBSCRIPTION items_sub CONNECTION '{conninfo(p)}' PUBLICATION items_pub")
    try:
        # The initial copy (a tablesync worker), then streamed changes (the apply worker).
        wait_until(lambda: sql(sub, "SELECT count(*) FROM items")[0][0] == 100, timeout=60,
                   message="initial table copy did not arrive")
        sql(pub, "INSERT INTO items SELECT g, 'late ' || g FROM generate_series(101, 120) g; "
                 "UPDATE items SET v = 'changed' WHERE id = 1")
        wait_until(lambda: sql(sub, "SELECT count(*), max(id) FROM items")[0] == (120, 120)
                   and sql(sub, "SELECT v FROM items WHERE id = 1")[0][0] == "changed",
                   timeout=60, message="streamed changes did not arrive")
        servers = [s for s in admin_rows(p, "SERVERS") if s["replication"] == "logical"]
        clients = [c for c in admin_rows(p, "CLIENTS") if c["replication"] == "logical"]
        assert servers and len(servers) == len(clients), (servers, clients)
        assert {s["link"] for s in servers} == {c["ptr"] for c in clients}
        assert [w for w in walsenders(pub) if w[1] == "items_sub" and w[2] == "streaming"]
    finally:
        sql(sub, "DROP SUBSCRIPTION items_sub")     # drops its slot through the pooler too
        sql(pub, "DROP PUBLICATION items_pub; DROP TABLE items")
    wait_until(lambda: not walsenders(pub), message="walsenders still connected")
    assert not sql(pub, "SELECT 1 FROM pg_replication_slots")


# ------------------------------------------------------------------ pool accounting

def test_replication_server_counts_against_pool_size(pub, pooler_factory):
    p = start_pooler(pooler_factory, pub, pool_size=1)
    # An ordinary client leaves an idle server: the pool (size 1) is full.
    with psycopg2.connect(p.dsn(DB, SUPER, SUPER_PW)) as c:
        with c.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            normal_pid = cur.fetchone()[0]
    first = repl_conn(p, "database", "repl-first")
    try:
        # Its own server, logged in with the replication parameter: the idle ordinary
        # server was evicted to make room for it.
        assert first.rows("IDENTIFY_SYSTEM")[0][3] == DB
        [(pid, app, _)] = walsenders(pub)
        assert app == "repl-first" and pid != normal_pid
        wait_until(lambda: not sql(pub, f"SELECT 1 FROM pg_stat_activity WHERE pid = {normal_pid}"),
                   message="the idle ordinary server was not evicted")
        [srv] = admin_rows(p, "SERVERS")
        assert (srv["replication"], srv["remote_pid"]) == ("logical", pid)
        # A second replication client waits: the only slot is taken and not idle.
        second = RawConn("127.0.0.1", p.port, 30)
        second.login(SUPER, SUPER_PW, DB, replication="true", application_name="repl-second")
        got: list = []
        t = threading.Thread(target=lambda: got.append(second.rows("IDENTIFY_SYSTEM")), daemon=True)
        t.start()
        wait_until(lambda: [c for c in admin_rows(p, "CLIENTS")
                            if c["replication"] == "physical" and c["state"] == "waiting"],
                   message="the second replication client is not shown waiting")
        assert not got and len(walsenders(pub)) == 1
    finally:
        first.close()
    # The first client left: its server is closed at once, never reused; the second
    # gets one of its own.
    t.join(20)
    assert got and got[0][0][3] is None            # physical: no database
    wait_until(lambda: pid not in [w[0] for w in walsenders(pub)],
               message="the first replication server outlived its client")
    [(pid2, app2, _)] = walsenders(pub)
    assert app2 == "repl-second" and pid2 != pid
    second.close()
    wait_until(lambda: not walsenders(pub), message="the replication server outlived its client")
    wait_until(lambda: not admin_rows(p, "SERVERS"), message="SHOW SERVERS still lists it")
    assert "replication client disconnected" in p.log()


def test_reconnect_closes_replication_servers_at_once(pub, pooler_factory):
    # Never released, a replication server marked close_needed goes with its client now.
    p = start_pooler(pooler_factory, pub)
    conn = repl_conn(p, "database", "to-reconnect")
    try:
        conn.rows("IDENTIFY_SYSTEM")
        c = psycopg2.connect(p.dsn("pgbouncer", ADMIN, ADMIN_PW))
        try:
            c.autocommit = True
            c.cursor().execute("RECONNECT")
        finally:
            c.close()
        err = conn.read_error()
        assert (err.sqlstate, err.message) == ("08006", "replication connection closed: RECONNECT")
        assert conn.at_eof()
    finally:
        conn.close()
    wait_until(lambda: not walsenders(pub), message="the replication server outlived RECONNECT")


def test_replication_in_session_pool_and_bad_value(pub, pooler_factory):
    p = start_pooler(pooler_factory, pub, pool_size=2, mode="session")
    conn = repl_conn(p, "database")
    try:
        rows = conn.rows("IDENTIFY_SYSTEM")
        assert rows[0][3] == DB
        # A replication=database connection also takes SQL (a walsender in database mode).
        assert conn.rows("SELECT 1") == [["1"]]
    finally:
        conn.close()
    bad = RawConn("127.0.0.1", p.port, 10)
    with pytest.raises(PgError) as exc:
        bad.login(SUPER, SUPER_PW, DB, replication="sometimes")
    assert exc.value.sqlstate == "22023"
    assert 'invalid value for parameter "replication": "sometimes"' in exc.value.message
    bad.close()


def test_refused_replication_login_fails_only_that_client(sub, pooler_factory):
    # `sub` has no pg_hba line for physical replication: PostgreSQL refuses the
    # replication server's login, and the client hears PostgreSQL's error.
    p = start_pooler(pooler_factory, sub, server_login_retry=30)
    conn = repl_conn(p, "true")
    try:
        conn.send_query("IDENTIFY_SYSTEM")
        err = conn.read_error()
        assert err.sqlstate == "28000" and "replication connection" in err.message, err
        assert conn.at_eof()
    finally:
        conn.close()
    # The pool's ordinary logins are not held back by it (no server_login_retry wait):
    # two transactions at once need a new server beside the idle one.
    conns = [psycopg2.connect(p.dsn(DB, SUPER, SUPER_PW), connect_timeout=10) for _ in range(2)]
    try:
        pids = set()
        for c in conns:
            with c.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                pids.add(cur.fetchone()[0])
        assert len(pids) == 2
    finally:
        for c in conns:
            c.close()


def test_replication_with_several_workers(pub, pooler_factory):
    # Prefork: the pool's budget is in shared memory and SHOW gathers every worker.
    p = start_pooler(pooler_factory, pub, pool_size=4, workers=2)
    conns = [repl_conn(p, kind, f"multi-{i}")
             for i, kind in enumerate(["database", "true", "database", "true"])]
    try:
        for c in conns:
            c.rows("IDENTIFY_SYSTEM")
        assert sorted(w[1] for w in walsenders(pub)) == [f"multi-{i}" for i in range(4)]
        shown = sorted(s["replication"] for s in admin_rows(p, "SERVERS"))
        assert shown == ["logical", "logical", "physical", "physical"]
        assert sorted(c["replication"] for c in admin_rows(p, "CLIENTS")
                      if c["database"] != "pgbouncer") == shown
    finally:
        for c in conns:
            c.close()
    wait_until(lambda: not walsenders(pub), message="walsenders outlived their clients")

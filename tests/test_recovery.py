"""Connection recovery (pooling/recovery.py): a client that disconnects inside a
transaction, mid-result, mid-query or inside an unsynced extended batch leaves its
server usable (the same backend serves the next client, no new one is opened) with the
client's work rolled back, as PostgreSQL rolls back a client that disconnects; SHOW
STATS counts what was recovered and what was closed instead. pool_size 1 and a real
PostgreSQL; the raw client plays the one that vanishes."""
from __future__ import annotations

import socket

import psycopg2

from conftest import APP_DB, SUPERUSER, SUPERUSER_PASSWORD, backend_count, raw_client, wait_until
from rawpg import bind, execute, parse, query


def rec_pooler(pooler_factory, pooler_config, app_userlist, **overrides):
    cfg = pooler_config(pool_mode="transaction", default_pool_size=1, admin_users=[SUPERUSER],
                        **overrides)
    return pooler_factory(cfg, app_userlist)


def one(p, sql):
    c = p.connect()
    c.autocommit = True
    try:
        with c.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        c.close()


def stats(p) -> dict:
    c = p.connect("pgbouncer", SUPERUSER, SUPERUSER_PASSWORD)
    c.autocommit = True
    try:
        with c.cursor() as cur:
            cur.execute("SHOW STATS")
            cols = [d.name for d in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall() if r[0] == APP_DB][0]
    finally:
        c.close()


def vanish(conn) -> None:
    """Gone without Terminate, as a killed process: an RST rather than a FIN."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    conn.sock.close()


def setup_table(pg):
    with psycopg2.connect(host=pg.host, port=pg.port, dbname=APP_DB, user="app",
                          password="apppass") as c, c.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS rec_t; CREATE TABLE rec_t (x int)")


def test_killed_inside_a_transaction_rolls_back_and_keeps_the_server(
        pg, pooler_factory, pooler_config, app_userlist):
    setup_table(pg)
    # Directly, PostgreSQL rolls back the transaction of a client that vanishes.
    d = raw_client(pg.port, password="apppass")
    d.exchange(query("BEGIN") + query("INSERT INTO rec_t VALUES (1)"))
    vanish(d)
    p = rec_pooler(pooler_factory, pooler_config, app_userlist)
    pid = one(p, "SELECT pg_backend_pid()")
    before = backend_count(pg, APP_DB)
    c = raw_client(p.port, password="apppass")
    c.exchange(query("BEGIN") + query("INSERT INTO rec_t VALUES (2)") +
               query("SET work_mem = '64MB'"))
    assert c.status == "T"
    vanish(c)
    assert one(p, "SELECT pg_backend_pid()") == pid          # the same backend, reused
    assert one(p, "SELECT count(*) FROM rec_t") == 0           # both rolled back
    assert one(p, "SHOW work_mem") == "4MB"
    assert backend_count(pg, APP_DB) == before                 # no new backend
    st = stats(p)
    assert (st["total_recovered_xact_count"], st["total_recovery_failed_count"]) == (1, 0)


def test_failed_block_and_unsynced_batch_are_recovered(pg, pooler_factory, pooler_config,
                                                       app_userlist):
    setup_table(pg)
    p = rec_pooler(pooler_factory, pooler_config, app_userlist)
    pid = one(p, "SELECT pg_backend_pid()")
    c = raw_client(p.port, password="apppass")
    c.exchange(query("BEGIN") + query("SELECT 1/0"))
    assert c.status == "E"
    vanish(c)
    assert one(p, "SELECT pg_backend_pid()") == pid
    # An extended batch that inserted, then no Sync: a Sync alone would commit it.
    c = raw_client(p.port, password="apppass")
    c.send(parse("", "INSERT INTO rec_t VALUES (3)") + bind("") + execute() +
           b"H\0\0\0\4")
    t, _ = c.read_msg()
    assert t == "1"
    wait_until(lambda: c.read_msg()[0] == "C")
    vanish(c)
    assert one(p, "SELECT pg_backend_pid()") == pid
    assert one(p, "SELECT count(*) FROM rec_t") == 0
    st = stats(p)
    assert st["total_recovered_xact_count"] == 1 and st["total_recovered_query_count"] == 1


def test_abandoned_result_and_running_query_are_drained(pg, pooler_factory, pooler_config,
                                                        app_userlist):
    p = rec_pooler(pooler_factory, pooler_config, app_userlist)
    pid = one(p, "SELECT pg_backend_pid()")
    c = raw_client(p.port, password="apppass")
    c.send(query("SELECT repeat('x', 1000) FROM generate_series(1, 20000)"))
    c.read_msg()                                              # the result has started
    vanish(c)
    assert one(p, "SELECT pg_backend_pid()") == pid
    c = raw_client(p.port, password="apppass")
    c.send(query("SELECT pg_sleep(30)"))
    wait_until(lambda: one_direct_active(pg))
    vanish(c)
    assert one(p, "SELECT pg_backend_pid()") == pid           # cancelled, drained, reused
    st = stats(p)
    assert st["total_recovered_query_count"] == 2 and st["total_recovery_failed_count"] == 0


def one_direct_active(pg) -> bool:
    with psycopg2.connect(host=pg.host, port=pg.port, dbname="postgres", user=SUPERUSER,
                          password=SUPERUSER_PASSWORD) as c, c.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
                    "AND state = 'active'")
        return cur.fetchone()[0] == 1


def test_recovery_off_closes_the_server(pg, pooler_factory, pooler_config, app_userlist):
    p = rec_pooler(pooler_factory, pooler_config, app_userlist, recovery_timeout=0)
    pid = one(p, "SELECT pg_backend_pid()")
    c = raw_client(p.port, password="apppass")
    c.exchange(query("BEGIN"))
    vanish(c)
    wait_until(lambda: stats(p)["total_recovery_failed_count"] == 1)
    assert one(p, "SELECT pg_backend_pid()") != pid

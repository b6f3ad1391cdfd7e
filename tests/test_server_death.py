"""A pooled server that PostgreSQL closes while it sits idle is dropped at once,
never handed to the next client (issue 14, item 1)."""
from __future__ import annotations

from conftest import APP_DB, APP_USER, backend_count, superuser_conn, wait_until

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

"""Limits: min_pool_size, reserve_pool_size/reserve_pool_timeout,
max_db_connections, max_user_connections, max_client_conn — counted in
pg_stat_activity, under load from real clients."""
from __future__ import annotations

import time

import psycopg2
import pytest

from conftest import (APP_DB, APP_USER, MD5_USER, Poller, backend_count, raw_client, run_threads,
                      wait_until)
from rawpg import PgError, RawConn, data_row, query


def start(pooler_factory, pooler_config, app_userlist, **overrides):
    cfg = pooler_config(**{"pool_mode": "transaction", "auth": {"type": "trust"}, **overrides})
    return pooler_factory(cfg, app_userlist)


def hold_transactions(p, n: int, user: str = "app", database: str = APP_DB) -> list[RawConn]:
    """n clients, each inside a transaction (so each holds a server)."""
    out = []
    for _ in range(n):
        w = raw_client(p.port, user=user, database=database)
        w.rows("BEGIN")
        out.append(w)
    return out


def close_all(ws) -> None:
    for w in ws:
        w.terminate()


def short_transactions(p, user: str = APP_USER, database: str = APP_DB, n: int = 10) -> None:
    """One client running n short transactions, each checking its own answer."""
    w = raw_client(p.port, user=user, database=database)
    for i in range(n):
        assert w.rows(f"BEGIN; SELECT {i}, pg_sleep(0.02); COMMIT")[0][0] == str(i)
    w.terminate()


# ----------------------------------------------------------------------------- min_pool_size

def test_min_pool_size_keeps_servers_open_without_clients(pg, pooler_factory, pooler_config,
                                                          app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=5, min_pool_size=3,
              server_idle_timeout=0.5)
    assert backend_count(pg, APP_DB) == 0
    w = raw_client(p.port)
    assert w.rows("SELECT 1") == [["1"]]
    w.terminate()
    # No client any more: the pool still fills to min_pool_size, and server_idle_timeout
    # does not close it below that.
    wait_until(lambda: backend_count(pg, APP_DB) == 3, timeout=5,
               message="min_pool_size servers were not opened")
    time.sleep(1.5)
    assert backend_count(pg, APP_DB) == 3
    # Busy clients may take it up to pool_size; afterwards it shrinks back to the minimum.
    ws = hold_transactions(p, 5)
    assert backend_count(pg, APP_DB) == 5
    close_all(ws)
    wait_until(lambda: backend_count(pg, APP_DB) == 3, timeout=6)


def test_min_pool_size_of_a_forced_user_database_opens_before_any_client(
        pg, pooler_factory, pooler_config, app_userlist):
    cfg = pooler_config(pool_mode="transaction", auth={"type": "trust"})
    cfg["databases"]["warm"] = {"host": pg.host, "port": pg.port, "dbname": APP_DB,
                                "user": "app", "password": "apppass", "min_pool_size": 2}
    pooler_factory(cfg, app_userlist)
    wait_until(lambda: backend_count(pg, APP_DB) == 2, timeout=5,
               message="a database with a forced user and min_pool_size was not warmed up")


# ----------------------------------------------------------------------------- reserve pool

def test_reserve_pool_serves_clients_that_waited_too_long(pg, pooler_factory, pooler_config,
                                                          app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=2,
              reserve_pool_size=2, reserve_pool_timeout=0.5)
    with Poller(lambda: backend_count(pg, APP_DB), interval=0.02) as poll:
        holders = hold_transactions(p, 2)
        # One waiting client gets a reserve server after reserve_pool_timeout.
        w3 = raw_client(p.port)
        t0 = time.monotonic()
        assert w3.rows("BEGIN; SELECT 3") == [["3"]]
        took = time.monotonic() - t0
        assert 0.4 < took < 2.5, f"reserve server after {took:.2f}s"
        assert backend_count(pg, APP_DB) == 3
        # Two more: one gets the last reserve server, the other must wait for a release.
        w4, w5 = raw_client(p.port), raw_client(p.port)
        w4.send(query("BEGIN; SELECT 4"))
        w5.send(query("BEGIN; SELECT 5"))
        time.sleep(2)
        assert backend_count(pg, APP_DB) == 4
        holders[0].rows("COMMIT")
        got = sorted(data_row(b)[0] for w in (w4, w5) for t, b in w.until_ready() if t == "D")
        assert got == ["4", "5"]
        assert backend_count(pg, APP_DB) == 4
    assert poll.max == 4, f"pool_size 2 + reserve 2 but saw {poll.max} servers"
    close_all(holders + [w3, w4, w5])


def test_reserve_pool_under_load_never_exceeds_size_plus_reserve(pg, pooler_factory,
                                                                 pooler_config, app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=3,
              reserve_pool_size=2, reserve_pool_timeout=0.2, max_client_conn=60)

    def client() -> None:
        conn = psycopg2.connect(p.dsn(password=None), connect_timeout=10)
        cur = conn.cursor()
        for _ in range(6):
            cur.execute("SELECT pg_sleep(0.05)")
            conn.commit()
        conn.close()

    with Poller(lambda: backend_count(pg, APP_DB), interval=0.02) as poll:
        run_threads(client, [()] * 30, timeout=60)
    assert poll.max <= 5, poll.max
    assert poll.max == 5, "the reserve pool was never used under a backlog"


# ----------------------------------------------------------------------------- db / user caps

def test_max_db_connections_caps_servers_across_pools(pg, pooler_factory, pooler_config,
                                                      app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=5,
              max_db_connections=3, query_wait_timeout=20)
    with Poller(lambda: backend_count(pg, APP_DB), interval=0.02) as poll:
        run_threads(lambda user: short_transactions(p, user=user),
                    [(u,) for u in ["app", MD5_USER] * 6], timeout=60)
    assert poll.max <= 3, f"max_db_connections=3 but saw {poll.max} servers"


def test_max_db_connections_moves_idle_servers_between_pools(pg, pooler_factory, pooler_config,
                                                             app_userlist):
    """Another user's pool must not keep the database's only slots forever with idle
    servers: they are closed for a client that needs a server (PgBouncer evicts too)."""
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=2,
              max_db_connections=2, query_wait_timeout=5)
    a = [raw_client(p.port, user="app") for _ in range(2)]
    for w in a:
        w.send(query("SELECT pg_sleep(0.2)"))
    for w in a:
        w.until_ready()
    assert backend_count(pg, APP_DB, "app") == 2          # idle, in app's pool
    b = raw_client(p.port, user=MD5_USER)
    t0 = time.monotonic()
    assert b.rows("SELECT current_user") == [[MD5_USER]]
    assert time.monotonic() - t0 < 2
    assert backend_count(pg, APP_DB) <= 2
    close_all(a + [b])


def test_max_user_connections_caps_servers_across_databases(pg, pooler_factory, pooler_config,
                                                            app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, default_pool_size=4,
              max_user_connections=3, query_wait_timeout=20)

    def user_backends() -> int:
        return backend_count(pg, APP_DB, "app") + backend_count(pg, "postgres", "app")

    with Poller(user_backends, interval=0.02) as poll:
        run_threads(lambda db: short_transactions(p, database=db),
                    [(d,) for d in [APP_DB, "postgres"] * 5], timeout=60)
    assert poll.max <= 3, f"max_user_connections=3 but saw {poll.max} servers"
    # Another user is not limited by app's cap.
    w = raw_client(p.port, user=MD5_USER)
    assert w.rows("SELECT 1") == [["1"]]
    w.terminate()


# ----------------------------------------------------------------------------- max_client_conn

def test_max_client_conn_refuses_with_53300(pg, pooler_factory, pooler_config, app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, max_client_conn=3)
    ws = [raw_client(p.port) for _ in range(3)]
    with pytest.raises(PgError) as exc:
        raw_client(p.port)
    assert exc.value.fields["C"] == "53300"
    assert exc.value.fields["M"] == "no more connections allowed (max_client_conn)"
    # A driver sees it too.
    with pytest.raises(psycopg2.OperationalError, match=r"max_client_conn"):
        psycopg2.connect(p.dsn(password=None), connect_timeout=5)
    # The connected clients are fine, and a slot freed is a slot reusable.
    assert [w.rows("SELECT 1") for w in ws] == [[["1"]]] * 3
    ws.pop().terminate()
    wait_until(lambda: _try_login(p), timeout=5)
    close_all(ws)


def _try_login(p) -> bool:
    try:
        w = raw_client(p.port)
    except PgError:
        return False
    w.rows("SELECT 1")
    w.terminate()
    return True

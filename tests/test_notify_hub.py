"""Shared LISTEN under transaction pooling (pooling/notifyhub.py, listencmd.py,
clientpush.py): one listening server per pool whatever the number of listening
clients, notifications delivered to each between its transactions and only after
commit, cleanup on UNLISTEN and exit, a lost listening server replaced. Real
PostgreSQL, psycopg2 clients through the pooler, pool_size 2, loopback only.
"""
from __future__ import annotations

import select
import time

import psycopg2
import psycopg2.errors
import pytest

from conftest import (APP_DB, APP_USER, SUPERUSER, SUPERUSER_PASSWORD, admin_show, direct_conn,
                      superuser_conn, wait_until)
from pooler.pooling.listencmd import parse


def tx_pooler(pooler_factory, pooler_config, app_userlist, **overrides):
    overrides.setdefault("default_pool_size", 2)
    overrides.setdefault("query_wait_timeout", 10)      # a test that waits fails in time
    cfg = pooler_config(pool_mode="transaction", admin_users=[SUPERUSER], **overrides)
    return pooler_factory(cfg, app_userlist)


def auto(p):
    c = p.connect()
    c.autocommit = True
    return c


def run(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall() if cur.description else cur.statusmessage


def notifies(conn, want: int, timeout: float = 5.0) -> list[tuple[str, str]]:
    """Wait (bounded) until `conn` has received `want` notifications; what it got."""
    deadline = time.monotonic() + timeout
    while len(conn.notifies) < want and time.monotonic() < deadline:
        select.select([conn], [], [], max(0.0, deadline - time.monotonic()))
        conn.poll()
    got = [(n.channel, n.payload) for n in conn.notifies]
    conn.notifies.clear()
    return got


def quiet(conn, wait: float = 0.3) -> list[tuple[str, str]]:
    """What arrives within `wait` seconds (expected: nothing)."""
    time.sleep(wait)
    conn.poll()
    return notifies(conn, 0, 0)


def listening_backends(pg, channel: str) -> list[int]:
    """Pids of backends whose (last) statement LISTENed on `channel` and still listen."""
    with superuser_conn(pg) as d:
        d.autocommit = True
        rows = run(d, f"SELECT pid FROM pg_stat_activity WHERE datname = '{APP_DB}' "
                      f"AND usename = '{APP_USER}' AND query LIKE 'LISTEN%{channel}%'")
    return [r[0] for r in rows]


def direct_notify(pg, sql):
    with direct_conn(pg, APP_DB, SUPERUSER) as d:
        d.autocommit = True
        run(d, sql)


@pytest.fixture
def hub_pooler(pooler_factory, pooler_config, app_userlist):
    return tx_pooler(pooler_factory, pooler_config, app_userlist)


def test_parse_is_strict():
    assert parse("LISTEN a") == ("LISTEN", "a")
    assert parse(" /* c /* nested */ */ listen \"Mixed Case\" ; -- end") == ("LISTEN", "Mixed Case")
    assert parse("UNLISTEN *") == ("UNLISTEN", None)
    assert parse("unlisten Foo;") == ("UNLISTEN", "foo")
    for text in ("LISTEN a; LISTEN b", "LISTEN a;;", "LISTEN select", "LISTEN", "LISTENa",
                 "NOTIFY a", 'LISTEN ""', "LISTEN /* open", "LISTEN " + "x" * 64, "LISTEN é"):
        assert parse(text) is None, text


def test_two_listeners_share_one_backend_and_both_get_it(pg, hub_pooler):
    a, b, c = auto(hub_pooler), auto(hub_pooler), auto(hub_pooler)
    try:
        assert run(a, "LISTEN hub_ch1") == "LISTEN"
        assert run(b, "listen HUB_CH1;") == "LISTEN"
        assert len(listening_backends(pg, "hub_ch1")) == 1, "one LISTEN for both clients"
        run(c, "NOTIFY hub_ch1, 'hello'")
        assert notifies(a, 1) == [("hub_ch1", "hello")]
        assert notifies(b, 1) == [("hub_ch1", "hello")]
        # The listening client is not pinned: it runs transactions on the other server
        # (the hub holds the first), and gets notifications between them.
        a.autocommit = False
        run(a, "SELECT 1")
        direct_notify(pg, "NOTIFY hub_ch1, 'while in a transaction'")
        assert quiet(a) == [], "delivered inside a transaction"
        a.commit()
        a.autocommit = True
        run(a, "SELECT 1")
        assert notifies(a, 1) == [("hub_ch1", "while in a transaction")]
        assert notifies(b, 1) == [("hub_ch1", "while in a transaction")]
    finally:
        for conn in (a, b, c):
            conn.close()


def test_notify_in_a_transaction_arrives_after_commit_only(hub_pooler):
    a, c = auto(hub_pooler), hub_pooler.connect()
    try:
        run(a, "LISTEN hub_tx")
        run(c, "NOTIFY hub_tx, 'rolled back'")
        c.rollback()
        run(c, "NOTIFY hub_tx, 'committed'")
        assert quiet(a) == [], "nothing before COMMIT"
        c.commit()
        assert notifies(a, 1) == [("hub_tx", "committed")]
        assert quiet(a) == []
    finally:
        a.close()
        c.close()


def test_unlisten_and_exit_clean_up(pg, hub_pooler):
    a, b, c = auto(hub_pooler), auto(hub_pooler), auto(hub_pooler)
    try:
        run(a, "LISTEN hub_clean")
        run(b, "LISTEN hub_clean")
        assert run(a, "UNLISTEN hub_clean") == "UNLISTEN"
        run(c, "NOTIFY hub_clean, 'one'")
        assert notifies(b, 1) == [("hub_clean", "one")]
        assert quiet(a) == [], "UNLISTEN stops delivery"
        assert run(a, "UNLISTEN *") == "UNLISTEN"
        b.close()                               # the last listener leaves
        wait_until(lambda: not listening_backends(pg, "hub_clean"), 5,
                   message="the channel stayed LISTENed after its last client left")
        # The hub's server went back to the pool: both servers serve transactions.
        a.autocommit = c.autocommit = False
        run(a, "SELECT 1")
        run(c, "SELECT 1")
        a.rollback()
        c.rollback()
    finally:
        for conn in (a, b, c):
            conn.close()


def test_discard_all_unlistens_as_in_postgresql(hub_pooler):
    """DISCARD ALL includes UNLISTEN * (PostgreSQL): the client's channels on the shared
    listener go too; inside a block it fails and changes nothing."""
    a, c = auto(hub_pooler), auto(hub_pooler)
    try:
        run(a, "LISTEN hub_discard")
        a.autocommit = False
        with pytest.raises(psycopg2.errors.ActiveSqlTransaction):
            run(a, "DISCARD ALL")
        a.rollback()
        a.autocommit = True
        run(c, "NOTIFY hub_discard, 'still'")
        assert notifies(a, 1) == [("hub_discard", "still")]
        assert run(a, "DISCARD ALL") == "DISCARD ALL"
        run(c, "NOTIFY hub_discard, 'gone'")
        assert quiet(a) == [], "DISCARD ALL left the client listening"
    finally:
        a.close()
        c.close()


def test_lost_listening_server_is_replaced(pg, hub_pooler):
    a, c = auto(hub_pooler), auto(hub_pooler)
    try:
        run(a, "LISTEN hub_lost")
        (pid,) = listening_backends(pg, "hub_lost")
        with superuser_conn(pg) as d:
            d.autocommit = True
            run(d, f"SELECT pg_terminate_backend({pid})")
        hub_pooler.wait_for_log(r"LISTEN connection to \S+ lost \(.*\): opening it again")
        hub_pooler.wait_for_log(r"LISTEN connection to \S+ open again: listening on 1 channels")
        run(c, "NOTIFY hub_lost, 'after'")
        assert notifies(a, 1) == [("hub_lost", "after")]
    finally:
        a.close()
        c.close()


def test_shared_listen_off_pins_as_before(pg, pooler_factory, pooler_config, app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, shared_listen=False)
    a, b, c = auto(p), auto(p), auto(p)
    try:
        run(a, "LISTEN hub_off")
        run(b, "LISTEN hub_off")

        def pins() -> list[str]:
            return sorted(c["pin"] for c in admin_show(p, "SHOW CLIENTS", SUPERUSER,
                                                        SUPERUSER_PASSWORD)
                          if c["database"] == APP_DB)
        wait_until(lambda: pins() == ["", "LISTEN", "LISTEN"], timeout=10,
                   message="each listener should pin its own server")
        direct_notify(pg, "NOTIFY hub_off, 'direct'")
        assert notifies(a, 1) == [("hub_off", "direct")]
        assert notifies(b, 1) == [("hub_off", "direct")]
    finally:
        for conn in (a, b, c):
            conn.close()


def test_multi_statement_listen_keeps_the_old_path(pg, hub_pooler):
    a, c = auto(hub_pooler), auto(hub_pooler)
    try:
        run(a, "LISTEN hub_multi_a; LISTEN hub_multi_b")   # not parsed: pins as before

        def pins() -> list[str]:
            return sorted(c["pin"] for c in admin_show(hub_pooler, "SHOW CLIENTS", SUPERUSER,
                                                        SUPERUSER_PASSWORD)
                          if c["database"] == APP_DB)
        # (the pin is found by the session check after the answer: wait for it)
        wait_until(lambda: pins() == ["", "LISTEN"], timeout=10,
                   message="a multi-statement LISTEN did not pin")
        run(c, "NOTIFY hub_multi_b, 'pinned'")
        assert notifies(a, 1) == [("hub_multi_b", "pinned")]
    finally:
        a.close()
        c.close()


def test_a_client_that_never_takes_its_notifications_is_disconnected(
        pooler_factory, pooler_config, app_userlist):
    """A listener that stays in one transaction has its notifications queued; past
    MAX_UNDELIVERED it is disconnected with 53400 (pool_size 3: hub, the transaction,
    the notifier)."""
    from pooler.pooling.notifyhub import MAX_UNDELIVERED
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=3)
    a, c = auto(p), auto(p)
    try:
        run(a, "LISTEN hub_flood")
        a.autocommit = False
        run(a, "SELECT 1")                      # holds a server: nothing is delivered
        run(c, "SELECT pg_notify('hub_flood', i::text) FROM "
               f"generate_series(1, {MAX_UNDELIVERED + 1}) i")
        p.wait_for_log(r"too many undelivered notifications")
        with pytest.raises(psycopg2.Error) as err:
            run(a, "SELECT 1")
            a.commit()
        assert err.value.pgcode in ("53400", None)
        assert run(c, "SELECT 1") == [(1,)]      # the others go on
    finally:
        a.close()
        c.close()

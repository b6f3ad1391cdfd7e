"""LISTEN/NOTIFY at scale under transaction pooling (the issue's test): 100 clients
listening on 10 channels through pool_size 2. Every notification reaches each of its
channel's listeners exactly once, in order, and the listeners keep running transactions
meanwhile, which a pinned LISTEN could not do with two servers for 100 clients.
"""
from __future__ import annotations

import select
import time

import psycopg2
import pytest

from conftest import APP_DB, APP_PASSWORD, APP_USER, SUPERUSER, superuser_conn

pytestmark = pytest.mark.timeout(120)

CLIENTS, CHANNELS, ROUNDS = 100, 10, 5


def drain(conns, want: int, deadline: float) -> None:
    """Poll every connection until each holds `want` notifications or time is up."""
    while time.monotonic() < deadline:
        short = [c for c in conns if len(c.notifies) < want]
        if not short:
            return
        ready, _, _ = select.select(short, [], [], 0.2)
        for c in ready:
            c.poll()


def test_hundred_listeners_on_ten_channels_through_two_servers(pg, pooler_factory,
                                                               pooler_config, app_userlist):
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=2,
                                     query_wait_timeout=20, admin_users=[SUPERUSER]),
                       app_userlist)
    listeners = []
    for i in range(CLIENTS):
        c = p.connect()
        c.autocommit = True
        with c.cursor() as cur:
            cur.execute(f"LISTEN fan_{i % CHANNELS}")
        listeners.append(c)
    # Listening holds no server per client: transactions still run on the two servers.
    for c in listeners[::10]:
        with c.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    sender = psycopg2.connect(host=pg.host, port=pg.port, dbname=APP_DB, user=APP_USER,
                              password=APP_PASSWORD)
    sender.autocommit = True
    with sender.cursor() as cur:
        for r in range(ROUNDS):
            for ch in range(CHANNELS):
                cur.execute("SELECT pg_notify(%s, %s)", (f"fan_{ch}", f"{ch}:{r}"))
    drain(listeners, ROUNDS, time.monotonic() + 30)
    for i, c in enumerate(listeners):
        ch = i % CHANNELS
        got = [(n.channel, n.payload) for n in c.notifies]
        assert got == [(f"fan_{ch}", f"{ch}:{r}") for r in range(ROUNDS)], (i, got)
    time.sleep(0.3)                          # nothing more arrives: exactly once
    for c in listeners:
        c.poll()
    assert all(len(c.notifies) == ROUNDS for c in listeners)
    # PostgreSQL holds each channel once (one listening backend), not once per client.
    with superuser_conn(pg) as su, su.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                    "backend_type = 'client backend' AND usename = %s", (APP_DB, APP_USER))
        assert cur.fetchone()[0] <= 3        # the two pool servers and the sender
    for c in listeners:
        c.close()
    sender.close()

"""SQL-level PREPARE / EXECUTE / DEALLOCATE under transaction pooling: the statements
follow the client to whichever server it gets (sqlprepare.py), no server is pinned,
and another client never sees them. pool_size 1 makes every client share one server,
so each step below runs on a server the other client used in between. Results are
compared with the same sequence straight to PostgreSQL."""
from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest

from conftest import SUPERUSER, SUPERUSER_PASSWORD, admin_show, wait_until
from test_session_state import Direct, auto, one, tx_pooler


def steps(a, b) -> list:
    """Two sessions interleaved; what each statement answered (an error: its SQLSTATE)."""
    out = []

    def do(conn, sql):
        try:
            out.append(one(conn, sql))
        except psycopg2.Error as e:
            out.append(e.pgcode)

    do(a, "PREPARE q(int) AS SELECT $1 * 2")
    do(b, "SELECT count(*) FROM pg_prepared_statements")         # A's is not B's
    do(b, "PREPARE q AS SELECT 'b'")                              # same name, its own
    do(a, "EXECUTE q(21)")
    do(b, "EXECUTE q")
    do(a, 'PREPARE "Mixed ""Name""" AS SELECT 3 -- a comment at the end')
    do(b, "BEGIN")
    do(b, "PREPARE in_tx AS SELECT 4")
    do(b, "ROLLBACK")                                             # PREPARE is not transactional
    do(a, 'EXECUTE "Mixed ""Name"""')
    do(b, "EXECUTE in_tx")
    do(a, "PREPARE q AS SELECT 0")                                # already exists
    do(a, "DEALLOCATE q")
    do(a, "EXECUTE q(1)")                                         # gone for A
    do(b, "EXECUTE q")                                            # B's still there
    do(a, "SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements")
    do(b, "DISCARD ALL")
    do(b, "SELECT count(*) FROM pg_prepared_statements")
    do(a, 'EXECUTE "Mixed ""Name"""')
    return out


def test_prepared_statements_follow_each_client(pg, pooler_factory, pooler_config, app_userlist):
    d = Direct(pg)
    theirs = steps(auto(d), auto(d))
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1)
    a, b = auto(p), auto(p)
    ours = steps(a, b)
    assert ours == theirs
    assert theirs[:6] == ["PREPARE", 0, "PREPARE", 42, "b", "PREPARE"]
    # One server for both: nothing was pinned (else B would have waited for ever).
    assert one(a, "SELECT pg_backend_pid()") == one(b, "SELECT pg_backend_pid()")
    clients = [c for c in admin_show(p, "CLIENTS", SUPERUSER, SUPERUSER_PASSWORD)
               if c["database"] == "app"]
    assert [c["pin"] for c in clients] == ["", ""], clients


def test_a_prepare_in_a_longer_query_string_pins(pg, pooler_factory, pooler_config, app_userlist):
    """PostgreSQL records the whole query string as the statement's text: it cannot be
    replayed alone, so the server stays with the client instead."""
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=2)
    a = auto(p)
    one(a, "PREPARE m AS SELECT 5; SELECT 1")

    def pin():
        return [c["pin"] for c in admin_show(p, "CLIENTS", SUPERUSER, SUPERUSER_PASSWORD)
                if c["database"] == "app"]
    wait_until(lambda: pin() == ["SQL PREPARE"], message=f"no pin: {pin()}")
    assert one(a, "EXECUTE m") == 5
    one(a, "DEALLOCATE m")
    wait_until(lambda: pin() == [""], message=f"still pinned: {pin()}")


def test_psycopg3_and_many_statements_move_between_servers(pg, pooler_factory, pooler_config,
                                                            app_userlist):
    psycopg = pytest.importorskip("psycopg")     # a test extra: always installed by bin/setup
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=1)
    with psycopg.connect(p.dsn(), autocommit=True) as a, \
            psycopg.connect(p.dsn(), autocommit=True) as b:
        for i in range(20):
            a.execute(f"PREPARE s{i} AS SELECT {i} + $1::int")
            b.execute("SELECT 1")                                  # takes the one server
        assert [a.execute(f"EXECUTE s{i}(100)").fetchone()[0] for i in range(20)] == \
            [100 + i for i in range(20)]
        # (B has a protocol-level statement of its own: psycopg prepares a query run 5 times.)
        assert b.execute("SELECT count(*) FROM pg_prepared_statements WHERE from_sql")\
            .fetchone()[0] == 0

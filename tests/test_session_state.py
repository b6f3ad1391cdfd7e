"""Session state under transaction pooling (pooling/sessionstate.py): SET / RESET of any
parameter follows its client and never leaks, transaction outcome is followed, values
are quoted, unmovable state pins the server. Real PostgreSQL, real drivers; pool_size 1
so the second client deterministically takes the first one's server in between, and
every result is compared with the same client connected straight to PostgreSQL.
"""
from __future__ import annotations

import os
import subprocess
import threading

import psycopg2
import pytest

from conftest import (admin_show, APP_DB, APP_PASSWORD, APP_USER, SUPERUSER, SUPERUSER_PASSWORD,
                      superuser_conn, wait_until)
from pooler.dev.devcluster import find_pg_bindir


def tx_pooler(pooler_factory, pooler_config, app_userlist, **overrides):
    overrides.setdefault("default_pool_size", 1)
    cfg = pooler_config(pool_mode="transaction", admin_users=[SUPERUSER], **overrides)
    return pooler_factory(cfg, app_userlist)


class Direct:
    """The same psycopg2 API as PoolerProc.connect, straight to PostgreSQL."""

    def __init__(self, pg):
        self.pg = pg

    def connect(self, **kw):
        return psycopg2.connect(host=self.pg.host, port=self.pg.port, dbname=APP_DB,
                                user=APP_USER, password=APP_PASSWORD, **kw)


def auto(target):
    c = target.connect()
    c.autocommit = True
    return c


def one(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0] if cur.description else cur.statusmessage


def admin_dicts(p, sql):
    return admin_show(p, sql, SUPERUSER, SUPERUSER_PASSWORD)


def both(pg, p):
    """Run a scenario through the pooler and directly: the observations must match."""
    def run(scenario):
        ours, theirs = scenario(p), scenario(Direct(pg))
        assert ours == theirs
        return ours
    return run


# --------------------------------------------------------------------- SET / RESET

def scenario_set_follows(target):
    a, b = auto(target), auto(target)
    try:
        out = [one(a, "SET work_mem = '8MB'"), one(a, "SET statement_timeout TO 4000"),
               one(b, "SHOW work_mem"), one(b, "SHOW statement_timeout"),
               one(a, "SHOW work_mem"), one(a, "SHOW statement_timeout")]
        one(b, "SET work_mem = '2MB'")
        out += [one(a, "SHOW work_mem"), one(b, "SHOW work_mem")]
        return out
    finally:
        a.close()
        b.close()


def test_untracked_set_follows_its_client_and_does_not_leak(pg, pooler_factory, pooler_config,
                                                            app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    out = both(pg, p)(scenario_set_follows)
    assert out == ["SET", "SET", "4MB", "0", "8MB", "4s", "8MB", "2MB"]
    # One server served both clients throughout.
    a, b = auto(p), auto(p)
    assert one(a, "SELECT pg_backend_pid()") == one(b, "SELECT pg_backend_pid()")


def scenario_outcome(target):
    a, b = auto(target), auto(target)
    try:
        out = []
        one(a, "BEGIN")
        one(a, "SET work_mem = '16MB'")
        out.append(one(a, "SHOW work_mem"))
        one(a, "ROLLBACK")
        out.append(one(b, "SHOW work_mem"))
        out.append(one(a, "SHOW work_mem"))            # rolled back: the default
        one(a, "BEGIN")
        one(a, "SET LOCAL work_mem = '3MB'")
        out.append(one(a, "SHOW work_mem"))
        one(a, "COMMIT")
        out.append(one(b, "SHOW work_mem"))
        out.append(one(a, "SHOW work_mem"))            # SET LOCAL lasted one transaction
        one(a, "BEGIN")
        one(a, "SET work_mem = '5MB'")
        one(a, "COMMIT")
        out.append(one(b, "SHOW work_mem"))
        out.append(one(a, "SHOW work_mem"))            # committed: kept
        with pytest.raises(psycopg2.Error):
            one(a, "SET work_mem = 'lots'")             # refused: nothing changes
        out.append(one(a, "SHOW work_mem"))
        one(a, "BEGIN")
        one(a, "SET work_mem = '6MB'")
        with pytest.raises(psycopg2.Error):
            one(a, "SELECT 1/0")
        one(a, "COMMIT")                               # of a failed block: a rollback
        out.append(one(b, "SHOW work_mem"))
        out.append(one(a, "SHOW work_mem"))
        return out
    finally:
        a.close()
        b.close()


def test_transaction_outcome_is_followed(pg, pooler_factory, pooler_config, app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    out = both(pg, p)(scenario_outcome)
    assert out == ["16MB", "4MB", "4MB", "3MB", "4MB", "4MB", "4MB", "5MB", "5MB", "4MB", "5MB"]


def scenario_reset(target):
    a, b = auto(target), auto(target)
    try:
        out = []
        one(a, "SET work_mem = '8MB'")
        one(a, "SET lock_timeout = '2s'")
        one(a, "RESET work_mem")
        out += [one(b, "SHOW lock_timeout"), one(a, "SHOW work_mem"), one(a, "SHOW lock_timeout")]
        one(a, "RESET ALL")
        out += [one(b, "SHOW work_mem"), one(a, "SHOW lock_timeout")]
        one(a, "SET work_mem = '9MB'")
        one(a, "DISCARD ALL")
        out += [one(b, "SHOW work_mem"), one(a, "SHOW work_mem")]
        return out
    finally:
        a.close()
        b.close()


def test_reset_reset_all_discard_all(pg, pooler_factory, pooler_config, app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    assert both(pg, p)(scenario_reset) == ["0", "4MB", "2s", "4MB", "0", "4MB", "4MB"]


def scenario_multi(target):
    a, b = auto(target), auto(target)
    try:
        out = []
        with a.cursor() as cur:
            cur.execute("SET work_mem = '5MB'; SELECT 1")
            out.append(cur.fetchone()[0])
            cur.execute("SELECT 2; /* then */ SET lock_timeout = 1500")
        out += [one(b, "SHOW work_mem"), one(b, "SHOW lock_timeout"),
                one(a, "SHOW work_mem"), one(a, "SHOW lock_timeout")]
        with a.cursor() as cur:                           # one implicit transaction
            with pytest.raises(psycopg2.Error):
                cur.execute("SET work_mem = '7MB'; SELECT 1/0")
        out += [one(b, "SHOW work_mem"), one(a, "SHOW work_mem")]
        one(a, "  /* a comment first */ SET search_path = pg_catalog, public")
        out += [one(b, "SHOW search_path"), one(a, "SHOW search_path")]
        return out
    finally:
        a.close()
        b.close()


def test_multi_statement_strings_and_comments(pg, pooler_factory, pooler_config, app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    assert both(pg, p)(scenario_multi) == [
        1, "4MB", "0", "5MB", "1500ms", "4MB", "5MB", '"$user", public', "pg_catalog, public"]


def scenario_injection(target):
    a, b = auto(target), auto(target)
    try:
        evil = "x'); DROP TABLE ss_victim; --\\' \"y"
        with a.cursor() as cur:
            cur.execute("SET myapp.note = %s", (evil,))
            cur.execute('SET "MyApp"."X" = \'1\'')     # quoted: a name in mixed case
        # (Once defined on a server a placeholder reads '' where it was never set: NULL
        # directly. The difference is documented; the value never leaks.)
        out = [one(b, "SELECT coalesce(current_setting('myapp.note', true), '')"),
               one(a, "SHOW myapp.note") == evil, one(a, 'SHOW "MyApp"."X"')]
        one(a, "RESET myapp.note")
        out += [one(b, "SELECT count(*) FROM ss_victim"), one(a, "SHOW myapp.note")]
        return out
    finally:
        a.close()
        b.close()


def test_values_and_names_are_quoted(pg, pooler_factory, pooler_config, app_userlist):
    with auto(Direct(pg)) as c:
        one(c, "DROP TABLE IF EXISTS ss_victim; CREATE TABLE ss_victim (x int)")
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    out = both(pg, p)(scenario_injection)
    assert out == ["", True, "1", 0, ""]


def scenario_role(target):
    a, b = auto(target), auto(target)
    try:
        out = [one(a, "SET ROLE ss_reader"), one(b, "SELECT current_user"),
               one(a, "SELECT current_user"), one(a, "SELECT session_user")]
        one(a, "RESET ROLE")
        out += [one(a, "SELECT current_user")]
        one(a, "SET ROLE ss_reader")
        one(b, "SELECT 1")
        one(a, "SET ROLE NONE")
        out += [one(b, "SELECT current_user"), one(a, "SELECT current_user")]
        return out
    finally:
        a.close()
        b.close()


def test_set_role_follows_its_client(pg, pooler_factory, pooler_config, app_userlist):
    with superuser_conn(pg) as c, c.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS ss_reader; CREATE ROLE ss_reader NOLOGIN; "
                    "GRANT ss_reader TO app")
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    assert both(pg, p)(scenario_role) == ["SET", "app", "ss_reader", "app", "app", "app", "app"]


def test_session_authorization_follows_its_client(pg, pooler_factory, pooler_config,
                                                  app_userlist):
    def scenario(target, **kw):
        a, b = target(), target()
        for c in (a, b):
            c.autocommit = True
        try:
            out = [one(a, "SET SESSION AUTHORIZATION app"), one(b, "SELECT session_user"),
                   one(a, "SELECT session_user"), one(a, "SELECT current_setting('is_superuser')")]
            one(a, "RESET SESSION AUTHORIZATION")
            out += [one(a, "SELECT session_user"), one(b, "SELECT session_user")]
            return out
        finally:
            a.close()
            b.close()

    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    ours = scenario(lambda: p.connect(APP_DB, SUPERUSER, SUPERUSER_PASSWORD))
    theirs = scenario(lambda: psycopg2.connect(host=pg.host, port=pg.port, dbname=APP_DB,
                                               user=SUPERUSER, password=SUPERUSER_PASSWORD))
    assert ours == theirs == ["SET", "postgres", "app", "off", "postgres", "postgres"]


def test_psycopg3_and_asyncpg_keep_their_settings(pg, pooler_factory, pooler_config,
                                                  app_userlist):
    psycopg = pytest.importorskip("psycopg")
    asyncpg = pytest.importorskip("asyncpg")
    import asyncio
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    other = auto(p)
    with psycopg.connect(p.uri(), autocommit=True) as c3:
        c3.execute("SET statement_timeout = '7s'")
        assert one(other, "SHOW statement_timeout") == "0"
        assert c3.execute("SHOW statement_timeout").fetchone()[0] == "7s"

    async def with_asyncpg():
        conn = await asyncpg.connect(p.uri(), statement_cache_size=0)
        try:
            # An extended-protocol Parse calling set_config, with the value a parameter.
            await conn.fetchval("SELECT set_config('work_mem', $1, false)", "9MB")
            assert one(other, "SHOW work_mem") == "4MB"
            return await conn.fetchval("SHOW work_mem")
        finally:
            await conn.close()
    assert asyncio.run(with_asyncpg()) == "9MB"
    other.close()


def test_psql_script_matches_direct(pg, pooler_factory, pooler_config, app_userlist, tmp_path):
    """psql sends each statement with its ';'; a second psql runs in between (\\!).
    The SQL PREPARE follows the script to whichever server it gets (sqlprepare.py)."""
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=2)
    psql = os.path.join(find_pg_bindir(), "psql")

    def run(port):
        other = f"{psql} -X -At -h 127.0.0.1 -p {port} -U app -d app -c 'SHOW work_mem'"
        script = (f"SET work_mem = '12MB';\n\\! {other}\nSHOW work_mem;\n"
                  f"BEGIN;\nSET work_mem = '1MB';\nROLLBACK;\n\\! {other}\nSHOW work_mem;\n"
                  f"PREPARE ss_q(int) AS SELECT $1 + 1;\n\\! {other}\nEXECUTE ss_q(41);\n"
                  "DEALLOCATE ss_q;\n")
        path = tmp_path / f"s{port}.sql"
        path.write_text(script)
        cp = subprocess.run([psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "app",
                             "-d", "app", "-f", str(path)], capture_output=True, text=True,
                            timeout=60, env={"PGPASSWORD": APP_PASSWORD, "PATH": "/usr/bin:/bin"})
        assert cp.returncode == 0, cp.stderr
        return cp.stdout.split()

    ours, theirs = run(p.port), run(pg.port)
    assert ours == theirs
    assert ours == ["SET", "4MB", "12MB", "BEGIN", "SET", "ROLLBACK", "4MB", "12MB", "PREPARE",
                    "4MB", "42", "DEALLOCATE"]


# --------------------------------------------------------------------- pins

def pins(p):
    return {c["id"]: c["pin"] for c in admin_dicts(p, "SHOW CLIENTS") if c["database"] == APP_DB}


def pins_become(p, want):
    """The state is read back just after the client got its ReadyForQuery: wait for it."""
    wait_until(lambda: sorted(pins(p).values()) == sorted(want),
               message=f"pins never became {want}: {pins(p)}")


def test_advisory_lock_pins_and_blocks_a_second_client(pg, pooler_factory, pooler_config,
                                                       app_userlist):
    # Directly: a session lock outlives the transaction; another session cannot take it.
    d1, d2 = auto(Direct(pg)), auto(Direct(pg))
    one(d1, "SELECT pg_advisory_lock(4242)")
    direct = [one(d2, "SELECT pg_try_advisory_lock(4242)")]
    one(d1, "SELECT pg_advisory_unlock(4242)")
    direct.append(one(d2, "SELECT pg_try_advisory_lock(4242)"))
    one(d2, "SELECT pg_advisory_unlock_all()")
    d1.close()
    d2.close()

    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=2)
    a, b = auto(p), auto(p)
    pid = one(a, "SELECT pg_advisory_lock(4242)")
    pid = one(a, "SELECT pg_backend_pid()")
    ours = [one(b, "SELECT pg_try_advisory_lock(4242)")]
    assert one(a, "SELECT pg_backend_pid()") == pid              # kept its server
    pins_become(p, ["advisory lock", ""])
    [srv] = [s for s in admin_dicts(p, "SHOW SERVERS") if s["remote_pid"] == pid]
    assert srv["pin"] == "advisory lock" and srv["link"]
    one(a, "SELECT pg_advisory_unlock(4242)")
    pins_become(p, ["", ""])                                     # released: unpinned
    ours.append(one(b, "SELECT pg_try_advisory_lock(4242)"))      # now B holds it: B pinned
    pins_become(p, ["", "advisory lock"])
    one(b, "SELECT pg_advisory_unlock_all()")
    assert ours == direct == [False, True]


def test_a_pinned_server_makes_others_wait(pg, pooler_factory, pooler_config, app_userlist):
    """pool_size 1: while A holds a session lock its server is not shared; B waits for it."""
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    a, b = auto(p), auto(p)
    one(a, "SELECT pg_advisory_lock(7)")
    got = []
    t = threading.Thread(target=lambda: got.append(one(b, "SELECT pg_try_advisory_lock(7)")))
    t.start()
    wait_until(lambda: any(c["state"] == "waiting" for c in admin_dicts(p, "SHOW CLIENTS")),
               message="B never waited")
    assert one(a, "SELECT 1") == 1 and not got                    # A keeps working
    one(a, "SELECT pg_advisory_unlock(7)")
    t.join(20)
    assert got == [True]


def test_temp_table_and_with_hold_cursor_pin_until_dropped(pg, pooler_factory, pooler_config,
                                                           app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=2)
    a, b = auto(p), auto(p)
    one(a, "CREATE TEMP TABLE ss_tmp AS SELECT 5 AS x")
    one(b, "SELECT 1")
    assert one(a, "SELECT x FROM ss_tmp") == 5
    pins_become(p, ["temporary table", ""])
    one(a, "BEGIN")
    one(a, "DECLARE ss_cur CURSOR WITH HOLD FOR SELECT generate_series(1, 3)")
    one(a, "COMMIT")
    pins_become(p, ["WITH HOLD cursor, temporary table", ""])
    one(a, "DROP TABLE ss_tmp")
    pins_become(p, ["WITH HOLD cursor", ""])
    assert one(a, "FETCH 2 FROM ss_cur") == 1
    one(a, "CLOSE ss_cur")
    pins_become(p, ["", ""])


def test_pinned_client_leaving_leaves_a_clean_server(pg, pooler_factory, pooler_config,
                                                     app_userlist):
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    a = auto(p)
    one(a, "CREATE TEMP TABLE ss_gone (x int)")
    one(a, "SELECT pg_advisory_lock(99)")
    pid = one(a, "SELECT pg_backend_pid()")
    a.close()
    b = auto(p)
    wait_until(lambda: one(b, "SELECT pg_backend_pid()") == pid)
    assert one(b, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    assert one(b, "SELECT count(*) FROM pg_class WHERE relname = 'ss_gone'") == 0


def test_pinning_off_for_a_database(pg, pooler_factory, pooler_config, app_userlist):
    cfg = pooler_config(pool_mode="transaction", default_pool_size=1, admin_users=[SUPERUSER])
    cfg["databases"][APP_DB]["pinning"] = False
    p = pooler_factory(cfg, app_userlist)
    a, b = auto(p), auto(p)
    one(a, "SELECT pg_advisory_lock(5)")
    # Not pinned: B gets the same (only) server, holding A's lock, as under PgBouncer.
    assert one(b, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 1
    assert set(pins(p).values()) == {""}                          # (read back at once: B ran)
    one(a, "SELECT pg_advisory_unlock_all()")


def test_pinned_client_whose_server_dies_is_closed(pg, pooler_factory, pooler_config,
                                                   app_userlist):
    """Its temp table and locks died with the backend: it cannot go on as if not."""
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)
    a = auto(p)
    one(a, "CREATE TEMP TABLE ss_lost (x int)")
    pid = one(a, "SELECT pg_backend_pid()")
    with superuser_conn(pg) as c, c.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg2.OperationalError):
        one(a, "SELECT 1")
    b = auto(p)
    assert one(b, "SELECT 1") == 1

"""The `options` startup parameter (libpq's `options=`, `PGOPTIONS`): its `-c name=value`
and `--name=value` settings of tracked parameters follow the client from server to
server as startup parameters do; others are refused with PgBouncer's words (08P01)
unless ignore_startup_parameters names them or `options` itself."""
from __future__ import annotations

import os
import subprocess

import psycopg2
import pytest

from conftest import APP_DB, APP_PASSWORD, APP_USER, app_direct
from pooler.dev.devcluster import find_pg_bindir
from rawpg import PgError, RawConn

PSQL = os.path.join(find_pg_bindir(), "psql")
# Four tracked settings, the three spellings, and an escaped space inside a value.
# (psycopg2 sets DateStyle itself, and psql its application_name: each test avoids one.)
OPTIONS = (r"-c search_path=opt_a,public -cIntervalStyle=iso_8601 --TimeZone=Asia/Tokyo "
           r"-c application_name=opt\ app")
SHOW_ALL = ("SELECT current_setting('search_path'), current_setting('IntervalStyle'), "
            "current_setting('TimeZone'), current_setting('application_name')")
PSQL_OPTIONS = r"-c search_path=opt_a,public -cDateStyle=German,\ YMD --TimeZone=Asia/Tokyo"
PSQL_SHOWS = ("search_path", "DateStyle", "TimeZone")


def start(pooler_factory, pooler_config, app_userlist, mode: str, **extra):
    # One server: every client of the pool runs on the same backend.
    return pooler_factory(pooler_config(pool_mode=mode, default_pool_size=1, **extra), app_userlist)


def settings(conn) -> tuple:
    with conn.cursor() as cur:
        cur.execute(SHOW_ALL)
        return cur.fetchone()


def backend_pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


@pytest.fixture
def reference(pg):
    """What PostgreSQL itself makes of OPTIONS, and its values without them."""
    with app_direct(pg) as plain:
        defaults = settings(plain)
    conn = psycopg2.connect(pg.unix_dsn(APP_DB, APP_USER, options=OPTIONS))
    try:
        with_options = settings(conn)
    finally:
        conn.close()
    assert with_options == ("opt_a,public", "iso_8601", "Asia/Tokyo", "opt app")
    assert with_options != defaults
    return with_options, defaults


def psql_show(host: str, port: int, options: str) -> list[str]:
    """psql with PGOPTIONS; each -c is its own query (its own transaction)."""
    env = dict(os.environ, PGOPTIONS=options, PGPASSWORD=APP_PASSWORD, PGCONNECT_TIMEOUT="10")
    cmd = [PSQL, "-X", "-w", "-A", "-t", "-h", host, "-p", str(port), "-U", APP_USER, "-d", APP_DB]
    for name in PSQL_SHOWS:
        cmd += ["-c", f"SHOW {name}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_pgoptions_with_psql(pg, pooler_factory, pooler_config, app_userlist, mode):
    p = start(pooler_factory, pooler_config, app_userlist, mode)
    direct = psql_show("127.0.0.1", pg.port, PSQL_OPTIONS)
    assert direct == ["opt_a,public", "German, YMD", "Asia/Tokyo"]
    assert psql_show(p.host, p.port, PSQL_OPTIONS) == direct


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_options_follow_the_client_not_the_server(pooler_factory, pooler_config, app_userlist,
                                                  reference, mode):
    """A client with `options` and one without share the only server: each sees its own
    values, at login (ParameterStatus) and in every query, and nothing leaks."""
    want, defaults = reference
    p = start(pooler_factory, pooler_config, app_userlist, mode)
    if mode == "session":
        # The server changes hands when a client leaves.
        pids = set()
        for opts in (OPTIONS, None, OPTIONS, None):
            conn = p.connect(options=opts) if opts else p.connect()
            conn.autocommit = True
            pids.add(backend_pid(conn))
            assert settings(conn) == (want if opts else defaults), opts
            conn.close()
        assert len(pids) == 1, pids
        return
    a = p.connect(options=OPTIONS)
    b = p.connect()
    a.autocommit = b.autocommit = True
    try:
        assert a.get_parameter_status("TimeZone") == "Asia/Tokyo"
        assert b.get_parameter_status("TimeZone") == defaults[2]
        for _ in range(3):
            assert settings(a) == want
            assert settings(b) == defaults
        assert backend_pid(a) == backend_pid(b), "not one server: the test proves nothing"
    finally:
        a.close()
        b.close()


def refusal(p, options: str) -> PgError:
    with RawConn(p.host, p.port) as c:
        with pytest.raises(PgError) as exc:
            c.login(APP_USER, APP_PASSWORD, APP_DB, options=options)
    return exc.value


SYNTAX = "unsupported options startup parameter: only '-c config=val' and '--config=val' are allowed"


def test_untracked_or_malformed_options_are_refused(pooler_factory, pooler_config, app_userlist):
    p = start(pooler_factory, pooler_config, app_userlist, "transaction")
    err = refusal(p, "-c search_path=x -c work_mem=8MB")
    assert (err.sqlstate, err.message) == ("08P01", "unsupported startup parameter in options: work_mem")
    for bad in ("-d 5", "-c search_path", "search_path=x"):
        err = refusal(p, bad)
        assert (err.sqlstate, err.message) == ("08P01", SYNTAX), bad
    with pytest.raises(psycopg2.OperationalError, match="in options: statement_timeout"):
        p.connect(options="-c statement_timeout=5s")
    # Nothing was broken for the next client.
    with p.connect(options="-c TimeZone=Asia/Tokyo") as conn, conn.cursor() as cur:
        cur.execute("SHOW TimeZone")
        assert cur.fetchone() == ("Asia/Tokyo",)
    conn.close()


@pytest.mark.parametrize("ignored", [["options"], ["work_mem"]])
def test_ignored_settings_in_options(pooler_factory, pooler_config, app_userlist, ignored):
    """Ignored settings are dropped, not applied; tracked ones still are. Only `options`
    in the list drops every untracked setting; a malformed value is refused anyway."""
    p = start(pooler_factory, pooler_config, app_userlist, "transaction",
              ignore_startup_parameters=ignored)
    conn = p.connect(options="-c work_mem=8MB -c search_path=opt_b")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('work_mem'), current_setting('search_path')")
        assert cur.fetchone() == ("4MB", "opt_b")
    conn.close()
    other = "-c statement_timeout=5s"
    if ignored == ["options"]:
        p.connect(options=other).close()
    else:
        assert refusal(p, other).message == "unsupported startup parameter in options: statement_timeout"
    assert refusal(p, "-d 5").message == SYNTAX

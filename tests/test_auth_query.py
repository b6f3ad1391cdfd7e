"""auth_user / auth_query (PgBouncer's): users missing from the auth_file are looked
up in the database, against a real PostgreSQL.

Two set-ups, as PgBouncer documents them: the superuser reading pg_shadow directly
(the default auth_query), and a dedicated unprivileged role calling a SECURITY
DEFINER function, which here also logs every call so the tests can count queries.
"""
from __future__ import annotations

import socket
import struct
import threading

import psycopg2
import pytest
import yaml

from conftest import (APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER, SUPERUSER,
                      SUPERUSER_PASSWORD)
from pooler.config.load import load_config

AQ_USER, AQ_PASSWORD = "aq_auth", "aqpass"
LOOKUP = "SELECT * FROM aq.user_lookup($1)"

SETUP_APP_DB = f"""
CREATE SCHEMA IF NOT EXISTS aq;
CREATE TABLE IF NOT EXISTS aq.calls (usename text NOT NULL, at timestamptz DEFAULT now());
CREATE OR REPLACE FUNCTION aq.user_lookup(i_username text, OUT uname text, OUT phash text)
RETURNS record LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO aq.calls (usename) VALUES (i_username);
    SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = i_username
      INTO uname, phash;
    RETURN;
END $$;
REVOKE ALL ON FUNCTION aq.user_lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA aq TO {AQ_USER};
GRANT EXECUTE ON FUNCTION aq.user_lookup(text) TO {AQ_USER};
"""
# The same function in the `postgres` database only, under another name: a client of
# `app` that logs in through it proves auth_dbname sent the query there.
SETUP_PG_DB = SETUP_APP_DB.replace("aq.", "aq_pg.").replace("SCHEMA aq", "SCHEMA aq_pg") \
    .replace("EXISTS aq;", "EXISTS aq_pg;")


@pytest.fixture(scope="module")
def aq(pg):
    """The dedicated auth role and the logging lookup functions (idempotent)."""
    pg.create_role(AQ_USER, AQ_PASSWORD)
    pg.psql(SETUP_APP_DB, db=APP_DB)
    pg.psql(SETUP_PG_DB, db="postgres")
    return pg


def calls(pg, user: str, db: str = APP_DB, schema: str = "aq") -> int:
    return int(pg.psql(f"SELECT count(*) FROM {schema}.calls WHERE usename = '{user}'", db=db))


def clear_calls(pg) -> None:
    pg.psql("TRUNCATE aq.calls", db=APP_DB)
    pg.psql("TRUNCATE aq_pg.calls", db="postgres")


def query_as(pooler, user: str, password: str, db: str = APP_DB) -> tuple:
    conn = pooler.connect(db=db, user=user, password=password)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database(), 40 + 2")
            return cur.fetchone()
    finally:
        conn.close()


def refused(pooler, user: str, password: str, db: str = APP_DB) -> str:
    with pytest.raises(psycopg2.OperationalError) as exc:
        pooler.connect(db=db, user=user, password=password).close()
    return str(exc.value)


def startup_error(pooler, user: str, db: str = APP_DB) -> dict[str, str]:
    """Send a startup packet; the fields of the ErrorResponse that comes back first."""
    body = struct.pack("!i", 196608) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in (("user", user), ("database", db))) + b"\0"
    with socket.create_connection((pooler.host, pooler.port), timeout=10) as s:
        s.sendall(struct.pack("!i", len(body) + 4) + body)
        data = b""
        while len(data) < 5 or len(data) < 1 + struct.unpack("!i", data[1:5])[0]:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data[:1] == b"E", f"expected an ErrorResponse first, got {data[:1]!r}"
    fields = {}
    for part in data[5:1 + struct.unpack("!i", data[1:5])[0]].split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def test_superuser_pg_shadow_scram(pg, pooler_factory, pooler_config):
    """The default query (pg_shadow) as the superuser; SCRAM with the client."""
    p = pooler_factory(pooler_config(auth={"user": SUPERUSER}),
                       userlist={SUPERUSER: SUPERUSER_PASSWORD})
    assert query_as(p, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB, 42)
    assert query_as(p, APP_USER, APP_PASSWORD, db="postgres") == (APP_USER, "postgres", 42)
    assert query_as(p, SUPERUSER, SUPERUSER_PASSWORD) == (SUPERUSER, APP_DB, 42)   # userlist
    assert 'password authentication failed for user "app"' in refused(p, APP_USER, "nope")
    assert 'password authentication failed for user "ghost"' in refused(p, "ghost", "x")
    # An md5-stored secret cannot do SCRAM (as in PostgreSQL): refused, not crashed.
    assert "password authentication failed" in refused(p, MD5_USER, MD5_PASSWORD)
    assert query_as(p, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB, 42)
    log = p.log()
    for secret in (APP_PASSWORD, "SCRAM-SHA-256$", pg.password_secret(MD5_USER)):
        assert secret not in log


def test_prefork_workers(pg, pooler_factory, pooler_config):
    """Each worker process has its own lookup cache; logins work in every one."""
    p = pooler_factory(pooler_config(workers=2, auth={"user": SUPERUSER}),
                       userlist={SUPERUSER: SUPERUSER_PASSWORD})
    for _ in range(6):
        assert query_as(p, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB, 42)
        assert "password authentication failed" in refused(p, APP_USER, "wrong")


def test_md5_auth_type_scram_and_md5_users(pg, pooler_factory, pooler_config):
    """auth.type md5: the md5-stored user does md5 (and its pool logs in to the server
    with the looked-up md5 secret); the SCRAM-stored one is upgraded to SCRAM."""
    p = pooler_factory(pooler_config(auth={"type": "md5", "user": SUPERUSER}, pool_mode="transaction",
                                     default_pool_size=3),
                       userlist={SUPERUSER: SUPERUSER_PASSWORD})
    assert query_as(p, MD5_USER, MD5_PASSWORD) == (MD5_USER, APP_DB, 42)
    assert query_as(p, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB, 42)
    # Several clients at once: the pool opens more servers with the remembered secret.
    conns = [p.connect(user=MD5_USER, password=MD5_PASSWORD) for _ in range(3)]
    try:
        for c in conns:
            c.autocommit = False
            with c.cursor() as cur:
                cur.execute("SELECT current_user")
                assert cur.fetchone() == (MD5_USER,)
        for c in conns:
            c.rollback()
    finally:
        for c in conns:
            c.close()
    assert 'password authentication failed for user "md5user"' in refused(p, MD5_USER, "wrong")
    assert 'password authentication failed for user "app"' in refused(p, APP_USER, "wrong")
    assert 'password authentication failed for user "ghost"' in refused(p, "ghost", "x")


def test_security_definer_function_runs_once_per_user(aq, pooler_factory, pooler_config):
    """A dedicated role and a SECURITY DEFINER function; a burst of logins within the
    cache time runs the query once per user (unknown users included)."""
    clear_calls(aq)
    p = pooler_factory(pooler_config(auth={"user": AQ_USER, "query": LOOKUP}),
                       userlist={AQ_USER: AQ_PASSWORD})
    errors: list[BaseException] = []

    def login() -> None:
        try:
            assert query_as(p, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB, 42)
        except BaseException as e:      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=login) for _ in range(12)]   # concurrent
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    for _ in range(5):                                              # then one after another
        login()
    assert not errors, errors
    assert calls(aq, APP_USER) == 1
    for _ in range(3):
        assert "password authentication failed" in refused(p, "ghost", "x")
        assert "password authentication failed" in refused(p, APP_USER, "wrong")
    assert calls(aq, "ghost") == 1 and calls(aq, APP_USER) == 1
    # A reload empties the cache (auth_user, its password or the query may have changed).
    start = len(p.log())
    p.update_config({"auth": {**yaml.safe_load(p.config_path.read_text())["auth"], "type": "md5"}})
    p.wait_for_log(r"config reloaded", start=start)
    assert query_as(p, MD5_USER, MD5_PASSWORD) == (MD5_USER, APP_DB, 42)
    assert query_as(p, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB, 42)
    assert calls(aq, MD5_USER) == 1 and calls(aq, APP_USER) == 2


def test_lookup_connection_lost_is_replaced(pg, pooler_factory, pooler_config):
    """The kept lookup connection dies (here: terminated); the next lookup opens another."""
    p = pooler_factory(pooler_config(auth={"type": "md5", "user": SUPERUSER}),
                       userlist={SUPERUSER: SUPERUSER_PASSWORD})
    assert query_as(p, APP_USER, APP_PASSWORD)[0] == APP_USER
    killed = pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                     "WHERE application_name = 'pooler auth_query'")
    assert killed == "1"
    assert query_as(p, MD5_USER, MD5_PASSWORD)[0] == MD5_USER


def test_auth_user_cannot_log_in(aq, pooler_factory, pooler_config):
    """auth_user's password is wrong: a clear error for looked-up users; userlist users
    and the pooler are unaffected."""
    p = pooler_factory(pooler_config(auth={"user": AQ_USER, "query": LOOKUP}),
                       userlist={AQ_USER: "not-the-password", SUPERUSER: SUPERUSER_PASSWORD})
    fields = startup_error(p, APP_USER)
    assert fields["C"] == "28000"
    assert "auth_query" in fields["M"] and AQ_USER in fields["M"], fields
    assert "auth_query" in refused(p, MD5_USER, MD5_PASSWORD)
    assert query_as(p, SUPERUSER, SUPERUSER_PASSWORD) == (SUPERUSER, APP_DB, 42)
    assert p.returncode is None
    assert "not-the-password" not in p.log()


def test_auth_query_error_is_reported(aq, pooler_factory, pooler_config):
    """A query that fails (here: no such function) names auth_query and the cause."""
    p = pooler_factory(pooler_config(auth={"user": SUPERUSER, "query": "SELECT * FROM aq.nope($1)"}),
                       userlist={SUPERUSER: SUPERUSER_PASSWORD})
    fields = startup_error(p, APP_USER)
    assert fields["C"] == "28000" and "auth_query failed" in fields["M"] and "aq.nope" in fields["M"]
    assert query_as(p, SUPERUSER, SUPERUSER_PASSWORD)[0] == SUPERUSER


def test_per_database_auth_user_and_auth_dbname(aq, pg, pooler_factory, pooler_config):
    """auth_user / auth_query / auth_dbname on a database entry (PgBouncer's); entries
    without them (and no global auth.user) know only the userlist."""
    clear_calls(aq)
    base = pooler_config()["databases"]
    dbs = {
        APP_DB: {**base[APP_DB], "auth_user": AQ_USER, "auth_query": LOOKUP},
        "viapg": {**base[APP_DB], "auth_user": AQ_USER, "auth_dbname": "postgres",
                  "auth_query": "SELECT * FROM aq_pg.user_lookup($1)"},
        "postgres": base["postgres"],
    }
    p = pooler_factory(pooler_config(databases=dbs), userlist={AQ_USER: AQ_PASSWORD})
    assert query_as(p, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB, 42)
    assert calls(pg, APP_USER) == 1
    assert query_as(p, APP_USER, APP_PASSWORD, db="viapg") == (APP_USER, APP_DB, 42)
    assert calls(pg, APP_USER, db="postgres", schema="aq_pg") == 1
    assert "password authentication failed" in refused(p, APP_USER, APP_PASSWORD, db="postgres")


def test_disabled_auth_dbname_refuses_logins_that_need_it(aq, pg, pooler_factory, pooler_config):
    """DISABLE of the database auth_dbname names: the users auth_query would find are
    refused with PgBouncer's 08P01 'authentication database "..." is disabled'; auth_file
    users and, after ENABLE, everyone get in."""
    p = pooler_factory(pooler_config(auth={"user": AQ_USER, "dbname": "postgres",
                                           "query": "SELECT * FROM aq_pg.user_lookup($1)"},
                                     admin_users=[SUPERUSER]),
                       userlist={AQ_USER: AQ_PASSWORD, SUPERUSER: SUPERUSER_PASSWORD})
    assert query_as(p, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB, 42)    # found in postgres
    admin = p.connect("pgbouncer", SUPERUSER, SUPERUSER_PASSWORD)
    admin.autocommit = True
    admin.cursor().execute("DISABLE postgres")
    fields = startup_error(p, APP_USER)             # refused before any password is asked for
    assert (fields["S"], fields["C"], fields["M"]) == (
        "FATAL", "08P01", 'authentication database "postgres" is disabled')
    assert 'authentication database "postgres" is disabled' in refused(p, APP_USER, APP_PASSWORD)
    assert query_as(p, SUPERUSER, SUPERUSER_PASSWORD) == (SUPERUSER, APP_DB, 42)   # auth_file
    admin.cursor().execute("ENABLE postgres")
    assert query_as(p, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB, 42)
    admin.close()


def test_ini_per_database_auth_settings(tmp_path):
    """pgbouncer.ini: auth_dbname and the [databases] auth_* keys are read, not ignored."""
    (tmp_path / "userlist.txt").write_text('"pgb" "secret"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[databases]\n"
                   "a = host=127.0.0.1 dbname=x auth_user=pgb auth_query='SELECT * FROM f($1)'"
                   " auth_dbname=b\n"
                   "b = host=127.0.0.1 dbname=y\n"
                   "[pgbouncer]\nauth_type = md5\nauth_file = userlist.txt\n"
                   "auth_user = pgb\nauth_dbname = b\n")
    cfg = load_config(str(ini))
    route = cfg.route("a")
    assert (route.auth_user, route.auth_query, route.auth_dbname) == ("pgb", "SELECT * FROM f($1)", "b")
    assert (cfg.auth.user, cfg.auth.dbname) == ("pgb", "b")
    ini.write_text(ini.read_text().replace("auth_dbname=b", "auth_dbname=nope"))
    with pytest.raises(Exception) as exc:
        load_config(str(ini))
    assert "auth_dbname" in str(exc.value) and "nope" in str(exc.value)


def test_database_auth_user_with_trust_and_no_auth_file(aq, pg, pooler_factory, pooler_config):
    """auth_type trust, no auth_file, auth_user on the database entry (PgBouncer): the
    login user must still exist, which auth_query decides; the servers log in as it
    (here over the Unix socket, trust in pg_hba) and a user auth_query does not find
    is refused."""
    clear_calls(aq)
    dbs = {APP_DB: {"host": pg.socket_dir, "port": pg.port, "dbname": APP_DB,
                    "auth_user": AQ_USER, "auth_query": LOOKUP}}
    p = pooler_factory(pooler_config(databases=dbs, auth={"type": "trust"}), userlist=None)
    conn = psycopg2.connect(host=p.host, port=p.port, dbname=APP_DB, user=APP_USER,
                            connect_timeout=10)
    with conn.cursor() as cur:
        cur.execute("SELECT current_user, current_database(), 6 * 7")
        assert cur.fetchone() == (APP_USER, APP_DB, 42)
    conn.close()
    assert calls(pg, APP_USER) == 1
    with pytest.raises(psycopg2.OperationalError) as exc:
        psycopg2.connect(host=p.host, port=p.port, dbname=APP_DB, user="nobody_here",
                         connect_timeout=10).close()
    assert 'FATAL:  no such user: "nobody_here"' in str(exc.value)   # trust: nothing to hide
    assert calls(pg, "nobody_here") == 1

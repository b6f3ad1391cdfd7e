"""PgBouncer 1.23-1.25 parity, the third batch: a database's own server_lifetime
(PgBouncer 1.23, #1057), server_check_query's `<empty>` default (PgBouncer 1.25, #1233:
an empty Query instead of `select 1`), and the prepared-statement counters of SHOW
STATS counted as PgBouncer's src/prepare.c counts them.

PgBouncer 1.18 (tests/bouncer.py) has none of the three (per-database server_lifetime
came in 1.23, prepared statements in 1.21), so these run against the pooler alone and
assert the behaviour PgBouncer's source and documentation give."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from bouncer import ADMIN, ADMIN_PASSWORD
from conftest import APP_DB, APP_PASSWORD, APP_USER, SUPERUSER, SUPERUSER_PASSWORD, wait_until
from rawpg import RawConn, bind, close, describe, execute, parse, SYNC
from test_admin import Admin

USERS = {APP_USER: APP_PASSWORD, SUPERUSER: SUPERUSER_PASSWORD, ADMIN: ADMIN_PASSWORD}


def _pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    conn.commit()
    return pid


# --------------------------------------------------------------------------- server_lifetime

LIFETIME_INI = """\
[databases]
app = host=127.0.0.1 port={pgport} dbname=app server_lifetime=1
postgres = host=127.0.0.1 port={pgport} dbname=postgres
quick = host=127.0.0.1 port={pgport} dbname=app server_lifetime=0
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = plain
auth_file = {userlist}
admin_users = admin
pool_mode = transaction
server_lifetime = 3600
"""


def test_a_databases_own_server_lifetime(pg, pooler_factory):
    """[databases] server_lifetime (PgBouncer 1.23): that entry's servers are replaced
    once older than it, another entry's stay; 0 is "not set" there (the global one);
    SHOW DATABASES shows each entry's own."""
    p = pooler_factory(LIFETIME_INI.replace("{pgport}", str(pg.port)), userlist=USERS,
                       filename="pgbouncer.ini")
    assert "server_lifetime is not supported" not in p.log()
    short = p.connect(APP_DB, APP_USER, APP_PASSWORD)
    long = p.connect("postgres", SUPERUSER, SUPERUSER_PASSWORD)
    zero = p.connect("quick", APP_USER, APP_PASSWORD)
    first = (_pid(short), _pid(long), _pid(zero))
    # Young enough: reused as is.
    assert (_pid(short), _pid(long), _pid(zero)) == first
    time.sleep(1.3)             # idle past app's lifetime, far within the global one
    again = (_pid(short), _pid(long), _pid(zero))
    assert again[0] != first[0], "app's server outlived its server_lifetime"
    assert again[1:] == first[1:], "the other entries' servers were replaced"
    admin = Admin(p)
    rows = {r["name"]: r for r in admin.dicts("SHOW DATABASES")}
    assert (rows["app"]["server_lifetime"], rows["postgres"]["server_lifetime"],
            rows["quick"]["server_lifetime"], rows["pgbouncer"]["server_lifetime"]) == (1, 3600, 3600, 3600)
    # A RELOAD changes it for the pool's servers from then on.
    p.config_path.write_text(p.config_path.read_text().replace(
        "dbname=postgres", "dbname=postgres server_lifetime=1"))
    admin.run("RELOAD")
    assert {r["name"]: r for r in admin.dicts("SHOW DATABASES")}["postgres"]["server_lifetime"] == 1
    time.sleep(1.1)
    assert _pid(long) != first[1]
    for c in (short, long, zero, admin.conn):
        c.close()


def test_global_server_lifetime_zero_uses_a_server_once(pooler_factory, pooler_config):
    """server_lifetime = 0 (PgBouncer 1.17+): a server serves one client, then closes."""
    p = pooler_factory(pooler_config(pool_mode="transaction", server_lifetime=0,
                                     admin_users=[ADMIN]), userlist=USERS)
    conn = p.connect()
    pids = [_pid(conn) for _ in range(3)]
    assert len(set(pids)) == 3, pids
    assert {r["name"]: r for r in Admin(p).dicts("SHOW DATABASES")}["app"]["server_lifetime"] == 0
    conn.close()


def test_yaml_database_server_lifetime(pooler_factory, pooler_config, pg):
    """The YAML spelling: a duration, as the global one; unset: the global value."""
    dbs = {APP_DB: {"host": pg.host, "port": pg.port, "server_lifetime": "1s"},
           "postgres": {"host": pg.host, "port": pg.port}}
    p = pooler_factory(pooler_config(databases=dbs, pool_mode="transaction", server_lifetime=7,
                                     admin_users=[ADMIN]), userlist=USERS)
    short = p.connect()
    pid = _pid(short)
    rows = {r["name"]: r for r in Admin(p).dicts("SHOW DATABASES")}
    assert (rows["app"]["server_lifetime"], rows["postgres"]["server_lifetime"]) == (1, 7)
    time.sleep(1.2)
    assert _pid(short) != pid
    short.close()

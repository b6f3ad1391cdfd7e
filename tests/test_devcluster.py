"""The throwaway PostgreSQL used by every other test."""

import os

import psycopg2
import pytest

from conftest import Poller, backend_count, wait_until
from pooler.dev.devcluster import TempPostgres, find_pg_bindir, free_port


def test_find_pg_bindir():
    assert os.path.isfile(os.path.join(find_pg_bindir(), "initdb"))


def test_free_port():
    assert 1024 < free_port() < 65536


def test_session_cluster_settings(pg):
    assert pg.psql("SHOW listen_addresses") == "127.0.0.1"
    assert pg.psql("SHOW max_connections") == "300"
    assert pg.psql("SHOW fsync") == "off"
    assert pg.psql("SELECT datname FROM pg_database WHERE datname = 'app'") == "app"
    assert pg.psql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'") == "app"


@pytest.mark.parametrize("user,password,method", [
    ("app", "apppass", "scram-sha-256"),
    ("md5user", "md5pass", "md5"),
    ("postgres", "postgres", "scram-sha-256"),
])
def test_tcp_login(pg, user, password, method):
    # require_auth (libpq >= 16) proves which method the server asked for.
    conn = psycopg2.connect(pg.dsn("app", user, password, require_auth=method, connect_timeout=10))
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, inet_server_addr()::text")
            assert cur.fetchone() == (user, "127.0.0.1/32")
    finally:
        conn.close()


def test_stored_secrets(pg):
    assert pg.password_secret("app").startswith("SCRAM-SHA-256$")
    assert pg.password_secret("md5user").startswith("md5")


def test_wrong_password_refused(pg):
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(pg.dsn("app", "app", "wrong", connect_timeout=10))


def test_psql_raises_on_error(pg):
    with pytest.raises(RuntimeError, match="does_not_exist"):
        pg.psql("SELECT * FROM does_not_exist")


def test_backend_count_and_poller(pg):
    base = backend_count(pg, "app", "app")
    conns = []
    with Poller(lambda: backend_count(pg, "app", "app")) as p:
        for _ in range(3):
            conns.append(psycopg2.connect(pg.dsn("app", "app", "apppass")))
        assert backend_count(pg, "app", "app") == base + 3
        wait_until(lambda: p.last == base + 3, timeout=5)
        for c in conns:
            c.close()
    assert p.max >= base + 3
    wait_until(lambda: backend_count(pg, "app", "app") == base, timeout=5)


def test_start_stop_removes_dir():
    port = free_port()
    pg = TempPostgres(port=port, extra_conf={"max_connections": "50"}).start()
    basedir, datadir = pg.basedir, pg.datadir
    try:
        assert pg.port == port
        assert os.path.isdir(datadir)
        assert pg.psql("SHOW max_connections") == "50"
        pg.create_role("tmpuser", "tmp'pass")
        pg.create_database("tmp db", owner="tmpuser")
        conn = psycopg2.connect(pg.dsn("tmp db", "tmpuser", "tmp'pass"))
        conn.close()
    finally:
        pg.stop()
    assert not os.path.exists(basedir)
    assert not pg.running
    pg.stop()  # idempotent
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password="postgres",
                         dbname="postgres", connect_timeout=2)

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
from conftest import (APP_DB, APP_PASSWORD, APP_USER, SUPERUSER, SUPERUSER_PASSWORD, backend_count,
                      superuser_conn, wait_until)
from pooler.config.ini import load_ini
from pooler.config.validate import parse_config
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


# --------------------------------------------------------------------------- server_check_query

EMPTY_QUERY = b"Q\x00\x00\x00\x05\x00"     # Query "": what PgBouncer 1.25 sends for <empty>


class Recorder:
    """A TCP relay between the pooler and PostgreSQL keeping every byte the pooler
    sends, so that a test sees exactly what went to the server."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.sent = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.lsock.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self.lock:
                        self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def bytes_sent(self) -> bytes:
        with self.lock:
            return bytes(self.sent)

    def close(self) -> None:
        self.lsock.close()


@pytest.fixture
def recorder(pg):
    r = Recorder("127.0.0.1", pg.port)
    yield r
    r.close()


@pytest.mark.parametrize("check_query, expect", [
    (None, EMPTY_QUERY),                      # the default, <empty>
    ("<empty>", EMPTY_QUERY),
    ("select 7", b"Q\x00\x00\x00\x0dselect 7\x00"),
    ("", None),                               # no check
])
def test_server_check_query_on_the_wire(pooler_factory, pooler_config, recorder, check_query,
                                        expect):
    """server_check_delay 0: every reuse of a server is preceded by the check, which by
    default (PgBouncer 1.25) is an empty Query, not `select 1`; '' sends none."""
    extra = {} if check_query is None else {"server_check_query": check_query}
    dbs = {APP_DB: {"host": "127.0.0.1", "port": recorder.port}}
    p = pooler_factory(pooler_config(databases=dbs, pool_mode="transaction", default_pool_size=1,
                                     server_check_delay=0, admin_users=[ADMIN], **extra),
                       userlist=USERS)
    conn = p.connect()
    conn.autocommit = True
    for marker in ("first", "second"):
        with conn.cursor() as cur:
            cur.execute(f"SELECT '{marker}'")
    sent = recorder.bytes_sent()
    between = sent[sent.index(b"SELECT 'first'"):sent.index(b"SELECT 'second'")]
    assert b"select 1" not in sent
    if expect is None:
        assert EMPTY_QUERY not in between and b"Q\x00\x00\x00\x0dselect" not in between
    else:
        assert between.count(expect) == 1, between
    config = {r["key"]: r for r in Admin(p).dicts("SHOW CONFIG")}
    assert config["server_check_query"]["default"] == "<empty>"
    assert config["server_check_query"]["value"] == ("<empty>" if check_query is None else check_query)
    conn.close()


def test_server_check_replaces_a_dead_idle_server_before_a_client_gets_it(pg, pooler_factory,
                                                                           pooler_config):
    """With the idle watch off (fault injection), a backend killed while idle is found
    by the default empty-query check (server_check_delay 0) and replaced: the client
    gets a new server and no error."""
    p = pooler_factory(pooler_config(pool_mode="transaction", default_pool_size=1,
                                     server_check_delay=0), userlist=USERS,
                       env={"POOLER_FAULT_NO_IDLE_WATCH": "1"})
    conn = p.connect()
    conn.autocommit = True
    old = _pid(conn)
    with superuser_conn(pg) as su, su.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (old,))
    wait_until(lambda: backend_count(pg, APP_DB, APP_USER) == 0, 5)
    assert _pid(conn) not in (0, old)
    log = p.log()
    assert "closing because: server check failed" in log, log[-2000:]
    assert "server conn crashed" not in log
    conn.close()


@pytest.mark.parametrize("line, value", [
    (None, "<empty>"), ("server_check_query = <empty>", "<empty>"),
    ("server_check_query =", ""), ("server_check_query = select 1", "select 1")])
def test_ini_and_yaml_read_server_check_query_alike(tmp_path, line, value):
    """Both readers: PgBouncer's default `<empty>`, '' (off) and a query as given."""
    (tmp_path / "userlist.txt").write_text('"app" "apppass"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("\n".join(["[databases]", "app = host=127.0.0.1 dbname=app server_lifetime=2",
                              "[pgbouncer]", "listen_addr = 127.0.0.1", "auth_type = plain",
                              f"auth_file = {tmp_path / 'userlist.txt'}", *([line] if line else [])]) + "\n")
    cfg = load_ini(str(ini))
    assert cfg.server_check_query == value
    assert cfg.route("app").server_lifetime == 2.0 and cfg.databases["app"].server_lifetime == 2.0
    yaml_cfg = parse_config({"databases": {"app": {"host": "127.0.0.1"}}, "auth": {"type": "trust"},
                             **({} if line is None else {"server_check_query": value})})
    assert yaml_cfg.server_check_query == value
    assert yaml_cfg.route("app").server_lifetime == 3600.0


# --------------------------------------------------------------------------- prepared counters


def _prepared_stats(admin: Admin, db: str = APP_DB) -> tuple[int, int, int]:
    row = {r["database"]: r for r in admin.dicts("SHOW STATS")}[db]
    totals = {r["database"]: r for r in admin.dicts("SHOW STATS_TOTALS")}[db]
    assert (totals["client_parse_count"], totals["server_parse_count"], totals["bind_count"]) == (
        row["total_client_parse_count"], row["total_server_parse_count"], row["total_bind_count"])
    return row["total_client_parse_count"], row["total_server_parse_count"], row["total_bind_count"]


def test_prepared_counters_count_as_pgbouncer(pg, pooler_factory, pooler_config):
    """SHOW STATS total_client_parse_count / total_server_parse_count / total_bind_count
    as PgBouncer's src/prepare.c increments them: a client's Parse of a named statement
    (handle_parse_command); a Parse sent to a server lacking the statement, at the
    client's Parse or before its Bind / Describe on another server
    (ensure_statement_is_prepared_on_server), but not when the server has it already;
    a client's Bind of a named statement, a name nobody prepared included. The unnamed
    statement counts nowhere, and session pooling (no tracking) counts nothing."""
    dbs = {APP_DB: {"host": pg.host, "port": pg.port},
           "postgres": {"host": pg.host, "port": pg.port, "pool_mode": "session"}}
    p = pooler_factory(pooler_config(databases=dbs, pool_mode="transaction", default_pool_size=1,
                                     admin_users=[ADMIN], auth={"type": "trust"}), userlist=USERS)
    admin = Admin(p)
    a = RawConn(p.host, p.port)
    a.login(APP_USER, None, APP_DB)
    b = RawConn(p.host, p.port)
    b.login(APP_USER, None, APP_DB)
    run = lambda conn, *msgs: conn.exchange(b"".join(msgs) + SYNC)   # noqa: E731

    run(a, parse("", "SELECT 1"), bind(""), execute())              # unnamed: nothing
    assert _prepared_stats(admin) == (0, 0, 0)
    run(a, parse("s1", "SELECT 2"))                                  # new on the server
    assert _prepared_stats(admin) == (1, 1, 0)
    run(a, bind("s1"), execute(), bind("s1"), execute())            # two binds, no parse
    assert _prepared_stats(admin) == (1, 1, 2)
    run(b, parse("s2", "SELECT 2"))        # the same statement, the server has it: no server parse
    run(b, bind("s2"), execute())
    assert _prepared_stats(admin) == (2, 1, 3)
    admin.run("RECONNECT app")                                        # a new server next
    run(a, bind("s1"), execute())          # prepared there first: a server parse and a bind
    assert _prepared_stats(admin) == (2, 2, 4)
    run(b, describe("S", "s2"))            # that server has it now: nothing
    admin.run("RECONNECT app")
    run(b, describe("S", "s2"))            # a Describe prepares it too, and is no bind
    assert _prepared_stats(admin) == (2, 3, 4)
    msgs = run(a, bind("nosuch"), execute())                        # counted, then refused
    assert "E" in [t for t, _ in msgs]
    run(a, close("S", "s1"), parse("s1", "SELECT 3"), bind("s1"), execute())
    assert _prepared_stats(admin) == (3, 4, 6)

    s = RawConn(p.host, p.port)                                      # session pooling: no tracking
    s.login(SUPERUSER, None, "postgres")
    run(s, parse("s1", "SELECT 2"), bind("s1"), execute())
    assert _prepared_stats(admin, "postgres") == (0, 0, 0)
    for c in (a, b, s):
        c.close()
    admin.conn.close()

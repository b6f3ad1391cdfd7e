"""Issue 16, the admin console and logins against PgBouncer 1.25: KILL / KILL_CLIENT
refusals, login_notify_message, SHUTDOWN WAIT_FOR_* with the console still usable,
RESUME while shutting down, WAIT_CLOSE after a RELOAD that moves a database, the
client login counters of SHOW STATS*, the shapes of SHOW PEERS / PEER_POOLS, and the
words of a refused password.

Where the Debian PgBouncer 1.18 has the behaviour, the same assertion runs against
it side by side (tests/bouncer.py); the rest is PgBouncer 1.23-1.25 behaviour (and,
for login_notify_message and the login counters, its source after 1.25.2) read from
its source and documentation, checked against the pooler alone."""
from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import subprocess
import time

import psycopg2
import pytest

from bouncer import ADMIN, ADMIN_PASSWORD, Bouncer, reconfigure, side_by_side, side_ini  # noqa: F401  (fixture)
from conftest import APP_DB, APP_PASSWORD, APP_USER, MD5_USER, MD5_PASSWORD, wait_until
from pooler.pooling import peering
from pooler.wire import protocol
from rawpg import PgError, RawConn
from test_admin import USERS, Admin, in_thread, pooler, query  # noqa: F401  (pooler: fixture)

TEXT, INT4, NUMERIC = 25, 23, 1700
PGBOUNCER_SQLSTATE = "08P01"


def _console_error(target, sql: str) -> tuple[str, str]:
    admin = Admin(target)
    try:
        err = admin.error(sql)
        return err.pgcode, err.diag.message_primary
    finally:
        admin.close()


# --------------------------------------------------------------------------- KILL, KILL_CLIENT


def test_kill_refusals_are_pgbouncers(side_by_side):
    """KILL of an unknown database and of the console itself: 08P01 and PgBouncer's words."""
    for target in side_by_side:
        assert _console_error(target, "KILL nosuch") == (PGBOUNCER_SQLSTATE,
                                                          "no such database: nosuch"), target
        assert _console_error(target, "KILL pgbouncer") == (PGBOUNCER_SQLSTATE,
                                                             "cannot kill admin db: pgbouncer"), target


def test_kill_client_refusals_are_pgbouncers(side_by_side):
    """KILL_CLIENT (PgBouncer 1.24, not in 1.18): a malformed id and an unknown one."""
    _, pooler = side_by_side
    admin = Admin(pooler)
    for cmd in ("KILL_CLIENT abc", "KILL_CLIENT x12", "KILL_CLIENT"):
        err = admin.error(cmd)
        assert (err.pgcode, err.diag.message_primary) == (PGBOUNCER_SQLSTATE,
                                                          "invalid client pointer supplied"), cmd
    err = admin.error("KILL_CLIENT 987654321")
    assert (err.pgcode, err.diag.message_primary) == (PGBOUNCER_SQLSTATE, "client not found")
    # An id is read as PgBouncer's sscanf reads it: its leading digits.
    victim = pooler.connect(APP_DB, APP_USER, APP_PASSWORD)
    victim.autocommit = True
    victim.cursor().execute("SET application_name = 'kill-me'")
    [row] = [c for c in admin.dicts("SHOW CLIENTS") if c["application_name"] == "kill-me"]
    assert admin.run(f"KILL_CLIENT {row['id']}abc") == "KILL_CLIENT"
    with pytest.raises(psycopg2.OperationalError):
        query(victim, "SELECT 1")
    admin.close()


# --------------------------------------------------------------------------- login_notify_message

NOTIFY_INI = """\
[databases]
app = host=127.0.0.1 port={pgport} dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
auth_type = plain
auth_file = {userlist}
admin_users = admin
login_notify_message = You are talking to a pooler, not to PostgreSQL
"""


def _psql(p, db: str, user: str, password: str, sql: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(["psql", "-X", "-A", "-t", "-h", p.host, "-p", str(p.port), "-U", user,
                           "-d", db, "-c", sql], capture_output=True, text=True, env=env, timeout=30)


def _notices(after_login: list[tuple[str, bytes]]) -> list[str]:
    return [protocol.parse_error_fields(b)["M"] for t, b in after_login if t == "N"]


def test_login_notify_message_is_a_notice_after_login(pg, pooler_factory):
    p = pooler_factory(NOTIFY_INI.replace("{pgport}", str(pg.port)), userlist=USERS,
                       filename="pgbouncer.ini")
    out = _psql(p, APP_DB, APP_USER, APP_PASSWORD, "SELECT 42")
    assert out.returncode == 0 and out.stdout.strip() == "42", out
    assert "NOTICE:  You are talking to a pooler, not to PostgreSQL" in out.stderr, out.stderr
    # On the wire: after BackendKeyData, before the first ReadyForQuery, as PgBouncer.
    with RawConn(p.host, p.port) as raw:
        after = raw.login(APP_USER, APP_PASSWORD, APP_DB)
        assert [t for t, _ in after][-3:] == ["K", "N", "Z"], after
        assert _notices(after) == ["You are talking to a pooler, not to PostgreSQL"]
        assert protocol.parse_error_fields([b for t, b in after if t == "N"][0])["S"] == "NOTICE"
    with RawConn(p.host, p.port) as raw:                 # the console's logins get it too
        assert _notices(raw.login(ADMIN, ADMIN_PASSWORD, "pgbouncer")) == [
            "You are talking to a pooler, not to PostgreSQL"]
    admin = Admin(p)
    config = {r[0]: r for r in admin.query("SHOW CONFIG")[1]}
    assert config["login_notify_message"][1:] == (
        "You are talking to a pooler, not to PostgreSQL", "", "yes")
    admin.run("SET login_notify_message = ''")          # changeable at run time; '' = none
    with RawConn(p.host, p.port) as raw:
        assert _notices(raw.login(APP_USER, APP_PASSWORD, APP_DB)) == []
    admin.close()


# --------------------------------------------------------------------------- SHUTDOWN


def test_shutdown_wait_for_servers_keeps_the_console(pooler):
    """SHUTDOWN WAIT_FOR_SERVERS (PgBouncer 1.23; 1.18 lacks it) while a transaction
    runs: the console that sent it stays usable (SHOW, RESUME refused with PgBouncer's
    words) until the process goes."""
    for target in (pooler,):
        busy = target.connect(APP_DB, APP_USER, APP_PASSWORD)
        assert query(busy, "SELECT 1") == 1                # a transaction holds a server
        admin = Admin(target)
        assert admin.run("SHUTDOWN WAIT_FOR_SERVERS") == "SHUTDOWN"
        with pytest.raises(psycopg2.OperationalError):     # TCP: nobody new gets in
            target.connect(APP_DB, APP_USER, APP_PASSWORD, connect_timeout=2)
        pools = admin.dicts("SHOW POOLS")
        assert [p["sv_active"] for p in pools if p["database"] == APP_DB] == [1], target
        err = admin.error("RESUME")
        assert (err.pgcode, err.diag.message_primary) == (PGBOUNCER_SQLSTATE,
                                                          "pooler is shutting down"), target
        assert query(busy, "SELECT 2") == 2                # the transaction may finish
        busy.commit()
        target.proc.wait(10)                               # then the process goes
        with pytest.raises(psycopg2.Error):
            admin.query("SHOW POOLS")


@pytest.mark.parametrize("workers", [1, 2])
def test_shutdown_keeps_the_unix_socket_for_the_console(pg, pooler_factory, pooler_config, tmp_path,
                                                        workers):
    """PgBouncer 1.25: while shutting down, the Unix socket stays open for admin logins
    (to see why it does not exit, or KILL_CLIENT a stuck client); others are refused.
    With two workers, the one without clients is gone by then; the other still serves."""
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    p = pooler_factory(pooler_config(unix_socket_dir=str(sock_dir), pool_mode="transaction",
                                     admin_users=[ADMIN], workers=workers), userlist=USERS)
    if workers > 1:
        wait_until(lambda: len(re.findall(r"worker \d+ listening", p.log())) >= workers, 15,
                   message="workers did not start")
    stuck = p.connect()
    stuck.autocommit = True
    stuck.cursor().execute("SET application_name = 'stuck'")
    admin = Admin(p)
    assert admin.run("SHUTDOWN WAIT_FOR_CLIENTS") == "SHUTDOWN"
    if workers > 1:
        # Each worker ends its shutdown when its own clients are gone (a console session
        # lasts as long as its worker): the one without the stuck client goes first.
        p.wait_for_log(r"worker \d+ exited with code 0")
    # (polled: with two workers the survivor hears of the SHUTDOWN a moment later)
    wait_until(lambda: _refusal(lambda: p.connect(connect_timeout=2)), 10,
               message="TCP still accepted")
    unix_login = wait_until(lambda: _refusal(lambda: psycopg2.connect(
        host=str(sock_dir), port=p.port, dbname=APP_DB, user=APP_USER, password=APP_PASSWORD,
        connect_timeout=5)), 10, message="a login to app over the Unix socket got in")
    assert "FATAL:  pooler is shutting down" in unix_login
    late = psycopg2.connect(host=str(sock_dir), port=p.port, dbname="pgbouncer", user=ADMIN,
                            password=ADMIN_PASSWORD, connect_timeout=5)
    late.autocommit = True
    with late.cursor() as cur:
        cur.execute("SHOW CLIENTS")
        names = [d.name for d in cur.description]
        [row] = [r for r in cur.fetchall() if r[names.index("application_name")] == "stuck"]
        time.sleep(0.3)
        assert p.returncode is None                        # waits for the stuck client
        cur.execute(f"KILL_CLIENT {row[names.index('id')]}")
    p.proc.wait(10)                                        # it was the last one: exit
    assert p.returncode == 0
    late.close()
    admin.close()


def _refusal(connect) -> str | None:
    """The error text if connect() is refused; None (and the connection closed) if not."""
    try:
        connect().close()
    except psycopg2.OperationalError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- RELOAD + WAIT_CLOSE


def _moved_ini(ini: str, pg, host: str) -> str:
    return ini.replace(f"app = host=127.0.0.1 port={pg.port}", f"app = host={host} port={pg.port}")


def test_reload_moving_a_database_marks_servers_and_wait_close_waits(pg, side_by_side):
    """A RELOAD that changes a database's host: its servers are close_needed, idle ones
    go, WAIT_CLOSE waits for the busy one, new transactions reach the new host."""
    for target in side_by_side:
        ini = target.ini_path.read_text() if isinstance(target, Bouncer) else target.config_path.read_text()
        idle, busy = (target.connect(APP_DB, APP_USER, APP_PASSWORD) for _ in range(2))
        idle.autocommit = True
        assert query(idle, "SELECT inet_client_addr()::text") is not None     # TCP to PostgreSQL
        assert query(busy, "SELECT 1") == 1                                   # in a transaction
        moved = _moved_ini(ini, pg, pg.socket_dir)
        if isinstance(target, Bouncer):
            target.ini_path.write_text(moved)
        else:
            target.config_path.write_text(moved)
        admin = Admin(target)
        admin.run("RELOAD")
        servers = [s for s in admin.dicts("SHOW SERVERS") if s["database"] == APP_DB]
        # (PgBouncer may list the idle one until its janitor closes it.)
        assert servers and all(s["close_needed"] == 1 for s in servers), (target, servers)
        waiting, out = in_thread(lambda: Admin(target).run("WAIT_CLOSE"))
        time.sleep(0.3)
        assert waiting.is_alive(), target
        assert query(idle, "SELECT inet_client_addr()::text") is None       # the new host: a socket
        busy.commit()
        waiting.join(5)
        assert out == {"result": "WAIT_CLOSE"}, target
        assert [s["close_needed"] for s in admin.dicts("SHOW SERVERS") if s["database"] == APP_DB] == [0]
        for c in (idle, busy, admin.conn):
            c.close()


# --------------------------------------------------------------------------- SHOW STATS login counters


def test_stats_count_client_logins(pooler_factory, pooler_config):
    """total_/avg_client_login_count (PgBouncer after 1.25.2, #1457): successful logins per database;
    a failed one does not count; the console's own under `pgbouncer`."""
    p = pooler_factory(pooler_config(admin_users=[ADMIN], stats_period=1), userlist=USERS)
    for _ in range(3):
        p.connect().close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        p.connect(password="wrong")
    admin = Admin(p)
    cols, _ = admin.query("SHOW STATS")
    names = [c for c, _ in cols]
    assert names.index("total_client_login_count") == names.index("total_bind_count") + 1
    # The last of PgBouncer's columns; only ours (transaction-pooling recovery, servers
    # moved between workers) follow it.
    last = names.index("avg_client_login_count")
    assert dict(cols)["avg_client_login_count"] == NUMERIC
    assert names[last + 1:] == ["total_recovered_xact_count", "total_recovered_query_count",
                                "total_recovery_failed_count", "total_server_moved_in_count"]
    stats = {r["database"]: r for r in admin.dicts("SHOW STATS")}
    assert stats[APP_DB]["total_client_login_count"] == 3
    assert stats["pgbouncer"]["total_client_login_count"] >= 1
    totals = {r["database"]: r for r in admin.dicts("SHOW STATS_TOTALS")}
    assert totals[APP_DB]["client_login_count"] == 3
    assert [c for c, _ in admin.query("SHOW STATS_AVERAGES")[0]][-1] == "avg_client_login_count"
    assert dict(admin.query("SHOW TOTALS")[1])["total_client_login_count"] >= 4
    time.sleep(1.1)                                    # a stats period: averages move
    p.connect().close()
    avgs = wait_until(lambda: {r["database"]: r for r in admin.dicts("SHOW STATS_AVERAGES")
                               if r["avg_client_login_count"]}, 5)
    assert avgs[APP_DB]["avg_client_login_count"] > 0
    admin.close()


# --------------------------------------------------------------------------- PEERS, PEER_POOLS


def test_show_peers_and_peer_pools_shapes(pooler_factory, pooler_config, tmp_path):
    """PgBouncer 1.25's columns and types; a peer pool appears with the first cancel
    request forwarded to that peer and counts it while it is on its way."""
    hold = socket.socket()                  # "peer 2": accepts and never answers
    hold.bind(("127.0.0.1", 0))
    hold.listen(4)
    peer_port = hold.getsockname()[1]
    p = pooler_factory(pooler_config(admin_users=[ADMIN], peer_id=1, default_pool_size=7,
                                     peers={2: {"host": "127.0.0.1", "port": peer_port},
                                            3: {"host": "/tmp/nowhere", "port": 6432}}),
                       userlist=USERS)
    admin = Admin(p)
    cols, rows = admin.query("SHOW PEERS")
    assert cols == [("peer_id", INT4), ("host", TEXT), ("port", INT4), ("pool_size", INT4)]
    assert rows == [(2, "127.0.0.1", peer_port, 7), (3, "/tmp/nowhere", 6432, 7)]
    cols, rows = admin.query("SHOW PEER_POOLS")
    assert cols == [("peer_id", INT4), ("cl_active_cancel_req", INT4), ("cl_waiting_cancel_req", INT4),
                    ("sv_active_cancel", INT4), ("sv_login", INT4)]
    assert rows == []
    pid, key = peering.new_cancel_key(2)
    cancel = socket.create_connection((p.host, p.port), timeout=10)
    cancel.sendall(struct.pack("!iiii", 16, 80877102, pid, key))
    conn, _ = hold.accept()                 # the pooler forwarded it here
    conn.settimeout(10)
    assert len(conn.recv(16)) == 16
    assert admin.query("SHOW PEER_POOLS")[1] == [(2, 1, 0, 1, 0)]
    lists = dict(admin.query("SHOW LISTS")[1])
    assert (lists["peers"], lists["peer_pools"]) == (2, 1)
    conn.close()                            # the peer is done with it
    wait_until(lambda: admin.query("SHOW PEER_POOLS")[1] == [(2, 0, 0, 0, 0)], 5)
    cancel.close()
    hold.close()
    admin.close()


# --------------------------------------------------------------------------- refused passwords


@pytest.mark.parametrize("auth_type", ["plain", "md5"])
def test_refused_password_words_are_pgbouncers(pg, side_by_side, auth_type):
    """A wrong password and a user the auth_file does not know get the same words (so
    nobody learns which users exist): PgBouncer's "password authentication failed",
    which the pooler follows with PostgreSQL's 'for user "..."'."""
    reconfigure(pg, side_by_side, auth_type)
    for target in side_by_side:
        for user, password in ((APP_USER, "wrong"), (MD5_USER, "wrong"), ("ghost", MD5_PASSWORD)):
            with pytest.raises(psycopg2.OperationalError) as exc:
                target.connect(APP_DB, user, password).close()
            text = str(exc.value)
            assert "FATAL:  password authentication failed" in text, (target, user, text)
            assert "no such user" not in text, (target, user, text)


def test_md5_secret_against_a_scram_server_is_the_wrong_password_type(pg, pooler_factory):
    """The auth_file holds only an md5 hash for a user whose PostgreSQL role has a SCRAM
    secret: the client's md5 login succeeds, the server login cannot (an md5 hash
    cannot answer SCRAM), and the client is told so in PgBouncer's words and SQLSTATE."""
    users = {APP_USER: "md5" + hashlib.md5((APP_PASSWORD + APP_USER).encode()).hexdigest()}
    bouncer = Bouncer(side_ini(pg, "md5"), users).start()
    try:
        pooler = pooler_factory(side_ini(pg, "md5"), userlist=users, filename="pgbouncer.ini")
        for target in (bouncer, pooler):
            conn = RawConn("127.0.0.1", target.port, 10)
            with pytest.raises(PgError) as exc:
                conn.login(APP_USER, APP_PASSWORD, APP_DB)
            conn.close()
            assert (exc.value.sqlstate, exc.value.message) == (
                PGBOUNCER_SQLSTATE, "server login failed: wrong password type"), target
    finally:
        bouncer.stop()

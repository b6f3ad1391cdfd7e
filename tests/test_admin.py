"""The admin console (virtual database `pgbouncer`): result shapes against the real
PgBouncer, counts under load, the exporter's queries, and the commands that change
state (PAUSE, RESUME, KILL, RECONNECT, WAIT_CLOSE, DISABLE, SHUTDOWN, RELOAD, SET)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psycopg2
import pytest
import yaml

from bouncer import (ADMIN, ADMIN_PASSWORD, STATS, STATS_PASSWORD, hold_transactions, pool_counts,
                     side_by_side)  # noqa: F401  (side_by_side: fixture)
from conftest import APP_DB, APP_PASSWORD, APP_USER, backend_count, wait_until
from rawpg import RawConn, message

TEXT, INT4, NUMERIC = 25, 23, 1700


class Admin:
    """An autocommit admin-console connection: query() -> (columns [(name, oid)], rows)."""

    def __init__(self, target, user: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
        self.conn = target.connect("pgbouncer", user, password)
        self.conn.autocommit = True

    def query(self, sql: str) -> tuple[list[tuple[str, int]], list[tuple]]:
        with self.conn.cursor() as cur:
            cur.execute(sql)
            if cur.description is None:
                return [], []
            return [(d.name, d.type_code) for d in cur.description], cur.fetchall()

    def dicts(self, sql: str) -> list[dict]:
        cols, rows = self.query(sql)
        return [dict(zip([c for c, _ in cols], r)) for r in rows]

    def run(self, sql: str) -> str:
        with self.conn.cursor() as cur:
            cur.execute(sql)
            return cur.statusmessage

    def error(self, sql: str) -> psycopg2.Error:
        with pytest.raises(psycopg2.Error) as exc:
            self.run(sql)
        return exc.value

    def close(self) -> None:
        self.conn.close()


def is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(x in it for x in small)


# --------------------------------------------------------------------------- snapshots


def test_snapshot_is_plain_json_and_views_sum_workers():
    """The contract with the prefork model: one JSON-able dict per worker; SHOW sums them."""
    from pooler.admin.local import LocalPooler
    from pooler.admin.views import SHOWS, StatsHistory, View
    from pooler.config.validate import parse_config
    from pooler.pooling.worker import Worker
    cfg = parse_config({"auth": {"type": "trust"}, "admin_users": [ADMIN],
                        "databases": {"app": {"port": 5432}}})
    [snap] = json.loads(json.dumps(LocalPooler(Worker(cfg, [])).snapshots()))
    assert snap["pools"] == [] and snap["state"]["pause_mode"] == "none"

    def pool(active: int, waiting: int, wait_s: int, xacts: int) -> dict:
        counts = {k: 0 for k in ("cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel",
                                 "sv_being_canceled", "sv_idle", "sv_used", "sv_tested", "sv_login")}
        stats = {k: 0 for k in ("server_assignment_count", "query_count", "bytes_in", "bytes_out",
                                "xact_time_us", "query_time_us", "wait_time_us", "client_parse_count",
                                "server_parse_count", "bind_count")}
        return {"database": "app", "user": "app", "server_user": "app", "mode": "transaction",
                **counts, "cl_active": active, "cl_waiting": waiting, "sv_active": active,
                "maxwait": wait_s, "maxwait_us": 5, "stats": {**stats, "xact_count": xacts}}
    snaps = [{**snap, "worker_id": i, "pools": [pool(i + 1, i, 3 * i, 10 * (i + 1))]} for i in (0, 1)]
    view = View(SimpleNamespace(cfg=cfg, config_path=""), snaps, StatsHistory())
    row = dict(zip([c for c, _ in SHOWS["pools"](view).columns], SHOWS["pools"](view).rows[0]))
    assert (row["cl_active"], row["cl_waiting"], row["sv_active"]) == (3, 1, 3)
    assert (row["maxwait"], row["maxwait_us"]) == (3, 5)         # the oldest waiter, not a sum
    totals = SHOWS["stats_totals"](view)
    assert totals.rows[0][:3] == ["app", 0, 30]                   # xact_count summed
    assert [r for r in SHOWS["databases"](view).rows if r[0] == "app"][0][11] == 3


# --------------------------------------------------------------------------- vs PgBouncer

SHOW_COMMANDS = ["VERSION", "CONFIG", "DATABASES", "POOLS", "CLIENTS", "SERVERS", "SOCKETS",
                 "ACTIVE_SOCKETS", "USERS", "STATS", "STATS_TOTALS", "STATS_AVERAGES", "TOTALS",
                 "LISTS", "MEM", "FDS", "DNS_HOSTS", "DNS_ZONES"]


def test_show_columns_match_pgbouncer(side_by_side):
    bouncer, pooler = side_by_side
    theirs, ours = Admin(bouncer), Admin(pooler)
    for cmd in SHOW_COMMANDS:
        their_cols, their_rows = theirs.query(f"SHOW {cmd}")
        our_cols, our_rows = ours.query(f"show {cmd.lower()};")
        # Same names and types in the same order; newer PgBouncer columns may sit between.
        assert is_subsequence(their_cols, our_cols), (cmd, their_cols, our_cols)
        if cmd in ("LISTS", "TOTALS"):      # one row per name: the names must be there too
            assert is_subsequence([r[0] for r in their_rows], [r[0] for r in our_rows]), cmd
    assert ours.query("SHOW STATE")[0] == [("key", TEXT), ("value", TEXT)]
    for admin in (theirs, ours):
        admin.query("SHOW HELP")
        assert "Console usage" in admin.conn.notices[-1]
    version = ours.query("SHOW VERSION")[1][0][0]
    cli = subprocess.run([sys.executable, "-m", "pooler", "-V"], capture_output=True, text=True,
                         timeout=30).stdout.strip()
    assert version == cli                                     # == `pooler -V`
    assert version.startswith("PgBouncer 1.23.1")
    # The relay step in use is named; CI builds the compiled one, and the pure-step
    # run (POOLER_PURE_STEP=1, see bin/test) must really run the pure one.
    pure = os.environ.get("POOLER_PURE_STEP", "") not in ("", "0")
    assert version.endswith(f"relay step: {'python' if pure else 'compiled'})"), version


def test_counts_match_pgbouncer_under_load(side_by_side):
    """pool_size=2 and 3 clients in a transaction each: 2 active, 1 waiting, in both."""
    shapes = []
    for target in side_by_side:
        release = threading.Event()
        threads = hold_transactions(target, 3, release)
        try:
            wait_until(lambda: pool_counts(target) == (2, 1, 2), 10,
                       message=f"{target}: pool never settled")
            admin = Admin(target)
            pool = next(p for p in admin.dicts("SHOW POOLS") if p["database"] == APP_DB)
            clients = sorted(c["state"] for c in admin.dicts("SHOW CLIENTS") if c["database"] == APP_DB)
            servers = sorted(s["state"] for s in admin.dicts("SHOW SERVERS") if s["database"] == APP_DB)
            db = next(d for d in admin.dicts("SHOW DATABASES") if d["name"] == APP_DB)
            lists = dict(admin.query("SHOW LISTS")[1])
            shapes.append((
                {k: pool[k] for k in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used",
                                      "sv_tested", "sv_login", "pool_mode")},
                clients, servers, db["current_connections"], db["pool_size"], lists["pools"],
                lists["databases"]))
            assert pool["maxwait"] * 1_000_000 + pool["maxwait_us"] > 0
            admin.close()
        finally:
            release.set()
            for t in threads:
                t.join(20)
    assert shapes[0] == shapes[1]
    assert shapes[1][1] == ["active", "active", "waiting"]


# --------------------------------------------------------------------------- the pooler alone

USERS = {APP_USER: APP_PASSWORD, ADMIN: ADMIN_PASSWORD, STATS: STATS_PASSWORD}


@pytest.fixture
def pooler(pooler_factory, pooler_config):
    """A pooler in transaction mode with pool_size 2, an admin and a stats user."""
    cfg = pooler_config(pool_mode="transaction", default_pool_size=2, admin_users=[ADMIN],
                        stats_users=[STATS])
    return pooler_factory(cfg, userlist=USERS)


def in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run fn() in a thread; the dict gets 'result' or 'error' when it ends."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as e:      # noqa: BLE001 - reported to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def query(conn, sql: str):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


EXPORTER_COLUMNS = {   # prometheus-community/pgbouncer_exporter: columns it maps to metrics
    "DATABASES": ["name", "host", "port", "database", "force_user", "pool_size", "reserve_pool",
                  "pool_mode", "max_connections", "current_connections", "paused", "disabled"],
    "STATS_TOTALS": ["database", "query_count", "query_time", "bytes_received", "bytes_sent",
                     "wait_time", "xact_count", "xact_time", "client_parse_count",
                     "server_parse_count", "bind_count"],
    "POOLS": ["database", "user", "cl_active", "cl_active_cancel_req", "cl_waiting",
              "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled",
              "sv_idle", "sv_used", "sv_tested", "sv_login", "maxwait"],
}
EXPORTER_LABELS = {"name", "host", "port", "database", "force_user", "pool_mode", "user"}


def test_exporter_queries_parse(pooler):
    conn = pooler.connect()
    query(conn, "SELECT 1")
    admin = Admin(pooler, STATS, STATS_PASSWORD)      # the exporter usually runs as a stats user
    admin.query("SHOW STATS")                         # its connection check
    cols, rows = admin.query("SHOW VERSION;")
    assert [c for c, _ in cols] == ["version"] and len(rows) == 1
    cols, rows = admin.query("SHOW LISTS;")
    assert len(cols) == 2 and all(float(items) >= 0 for _, items in rows)
    cols, rows = admin.query("SHOW CONFIG;")
    assert len(cols) == 4
    config = {r[0]: r[1] for r in rows}
    assert float(config["max_client_conn"]) == 100 and float(config["max_user_connections"]) == 0
    for cmd, wanted in EXPORTER_COLUMNS.items():
        cols, rows = admin.query(f"SHOW {cmd};")
        types = dict(cols)
        assert set(wanted) <= set(types), cmd
        for row in rows:
            for (name, oid), value in zip(cols, row):
                if name in EXPORTER_LABELS:
                    assert oid in (TEXT, INT4), (cmd, name)      # labels: text or int
                elif name in wanted:
                    assert value is None or float(value) >= 0, (cmd, name, value)
    assert any(r[0] == APP_DB for r in admin.query("SHOW STATS_TOTALS")[1])
    conn.close()


def test_pause_waits_for_transactions_then_holds_until_resume(pg, pooler):
    busy = pooler.connect()
    query(busy, "SELECT 1")                     # a transaction is open on a server
    admin, watcher = Admin(pooler), Admin(pooler)
    pause, out = in_thread(lambda: admin.run("PAUSE"))
    time.sleep(0.5)
    assert pause.is_alive(), "PAUSE returned while a transaction was in flight"
    assert dict(watcher.query("SHOW STATE")[1])["paused"] == "yes"
    busy.commit()
    pause.join(5)
    assert out == {"result": "PAUSE"}
    assert backend_count(pg, APP_DB) == 0       # servers are closed as they are released
    assert watcher.error("PAUSE").pgcode == "55000"   # already paused

    held = pooler.connect()
    t, got = in_thread(lambda: query(held, "SELECT 42"))
    wait_until(lambda: watcher.dicts("SHOW POOLS")[0]["cl_waiting"] == 1, 5)
    assert t.is_alive()
    assert watcher.run("RESUME") == "RESUME"
    t.join(5)
    assert got == {"result": 42}
    assert watcher.error("RESUME").pgcode == "55000"  # not paused any more
    for conn in (busy, held, admin.conn, watcher.conn):
        conn.close()


def test_kill_reconnect_and_wait_close(pg, pooler):
    admin = Admin(pooler)
    idle = pooler.connect()
    idle.autocommit = True
    first = query(idle, "SELECT pg_backend_pid()")
    assert admin.run("RECONNECT app") == "RECONNECT"
    assert query(idle, "SELECT pg_backend_pid()") != first      # the idle server was closed

    busy = pooler.connect()
    pid = query(busy, "SELECT pg_backend_pid()")                 # in a transaction
    admin.run("RECONNECT")
    [srv] = [s for s in admin.dicts("SHOW SERVERS") if s["remote_pid"] == pid]
    assert srv["close_needed"] == 1
    waiting, out = in_thread(lambda: Admin(pooler).run("WAIT_CLOSE app"))
    time.sleep(0.3)
    assert waiting.is_alive()
    busy.commit()                                                # released -> closed
    waiting.join(5)
    assert out == {"result": "WAIT_CLOSE"}
    assert pid not in [s["remote_pid"] for s in admin.dicts("SHOW SERVERS")]

    assert admin.run("KILL app") == "KILL"
    with pytest.raises(psycopg2.OperationalError):
        query(idle, "SELECT 1")                                  # its client was dropped
    wait_until(lambda: backend_count(pg, APP_DB) == 0, 5)
    late = pooler.connect()                                      # killed db: waits for RESUME
    t, got = in_thread(lambda: query(late, "SELECT 7"))
    time.sleep(0.3)
    assert t.is_alive()
    admin.run("RESUME app")
    t.join(5)
    assert got == {"result": 7}
    assert admin.error("KILL nosuch").pgerror.startswith("ERROR:  no such database: nosuch")
    for conn in (idle, busy, late, admin.conn):
        conn.close()


def test_kill_client_by_id(pooler):
    admin = Admin(pooler)
    victim, bystander = pooler.connect(), pooler.connect()
    victim.autocommit = bystander.autocommit = True
    app_name = "victim-app"
    victim.cursor().execute(f"SET application_name = '{app_name}'")
    [row] = [c for c in admin.dicts("SHOW CLIENTS") if c["application_name"] == app_name]
    assert admin.run(f"KILL_CLIENT {row['id']}") == "KILL_CLIENT"
    with pytest.raises(psycopg2.OperationalError):
        query(victim, "SELECT 1")
    assert query(bystander, "SELECT 1") == 1
    assert admin.error(f"KILL_CLIENT {row['id']}").pgcode == "08P01"     # client not found
    bystander.close()
    admin.close()


def test_disable_refuses_new_clients_of_that_database_only(pooler):
    admin = Admin(pooler)
    existing = pooler.connect()
    assert admin.run("DISABLE app") == "DISABLE"
    with pytest.raises(psycopg2.OperationalError, match="database does not allow connections: app"):
        pooler.connect()
    pooler.connect(db="postgres").close()                        # other databases still work
    assert query(existing, "SELECT 1") == 1                      # and so do existing clients
    assert [d["disabled"] for d in admin.dicts("SHOW DATABASES") if d["name"] == APP_DB] == [1]
    assert admin.run("ENABLE app") == "ENABLE"
    pooler.connect().close()
    assert admin.error("DISABLE").pgerror.startswith("ERROR:  a database is required")
    existing.close()
    admin.close()


def test_shutdown_wait_for_clients_drains(pooler):
    client = pooler.connect()
    client.autocommit = True
    admin = Admin(pooler)
    assert admin.run("SHUTDOWN WAIT_FOR_CLIENTS") == "SHUTDOWN"
    with pytest.raises(psycopg2.OperationalError):
        pooler.connect(connect_timeout=2)                        # no new clients
    time.sleep(0.3)
    assert pooler.returncode is None
    assert query(client, "SELECT 5") == 5                       # existing ones are served
    client.close()
    pooler.proc.wait(10)                                         # the last one left: exit
    assert pooler.returncode == 0
    assert "SHUTDOWN WAIT_FOR_CLIENTS command issued" in pooler.log()


def test_shutdown_wait_for_servers_lets_transactions_finish(pooler):
    busy = pooler.connect()
    assert query(busy, "SELECT 1") == 1                         # a transaction in flight
    admin = Admin(pooler)
    assert admin.run("SHUTDOWN WAIT_FOR_SERVERS") == "SHUTDOWN"
    with pytest.raises(psycopg2.OperationalError):
        pooler.connect(connect_timeout=2)
    assert query(busy, "SELECT 2") == 2                          # it may finish...
    busy.commit()
    pooler.proc.wait(10)                                         # ...then the pooler goes
    assert pooler.returncode == 0


def test_shutdown_now_and_suspend(pooler):
    admin = Admin(pooler)
    client = pooler.connect()
    client.autocommit = True
    assert admin.run("SUSPEND") == "SUSPEND"
    assert dict(admin.query("SHOW STATE")[1]) == {"active": "no", "paused": "no", "suspended": "yes"}
    t, got = in_thread(lambda: query(client, "SELECT 3"))
    time.sleep(0.3)
    assert t.is_alive()                                          # held while suspended
    assert admin.error("PAUSE").pgcode == "55000"                # already suspended/paused
    admin.run("RESUME")
    t.join(5)
    assert got == {"result": 3}
    with pytest.raises(psycopg2.OperationalError):
        admin.run("SHUTDOWN")                                    # no reply: the process ends
    pooler.proc.wait(10)
    assert pooler.returncode == 0


def test_reload_of_bad_file_keeps_old_config_and_set(pooler):
    admin = Admin(pooler)

    def setting(key: str) -> str:
        return {r[0]: r[1] for r in admin.query("SHOW CONFIG")[1]}[key]
    good = pooler.config_path.read_text()
    cfg = yaml.safe_load(good)
    pooler.config_path.write_text(yaml.safe_dump({**cfg, "default_pool_size": "many"}))
    err = admin.error("RELOAD")
    assert err.pgcode == "F0000" and "default_pool_size: 'many' is not valid" in err.diag.message_detail
    assert setting("default_pool_size") == "2"                  # the old config stays
    pooler.config_path.write_text(yaml.safe_dump({**cfg, "default_pool_size": 7}))
    assert admin.run("RELOAD") == "RELOAD"
    assert setting("default_pool_size") == "7"

    assert admin.run("SET default_pool_size = 5") == "SET default_pool_size=5"
    assert admin.run("set server_check_query to 'select 2'") == "SET server_check_query=select 2"
    assert (setting("default_pool_size"), setting("server_check_query")) == ("5", "select 2")
    assert admin.error("SET default_pool_size = 'x'").pgcode == "22023"
    assert admin.error("SET no_such_key = 1").pgcode == "42704"
    assert admin.error("SET listen_port = 1").pgcode == "55P02"
    config_rows = {r[0]: r for r in admin.query("SHOW CONFIG")[1]}
    assert config_rows["listen_port"][3] == "no" and config_rows["default_pool_size"][2] == "20"


def test_access_rules_and_protocol(pooler):
    stats = Admin(pooler, STATS, STATS_PASSWORD)
    assert stats.query("SHOW POOLS")[1]
    for cmd in ("PAUSE", "RELOAD", "SET default_pool_size = 3", "SHOW FDS", "KILL app"):
        err = stats.error(cmd)
        assert err.pgcode == "42501" and "admin access needed" in err.pgerror, cmd
    with pytest.raises(psycopg2.OperationalError, match="not allowed"):
        pooler.connect(db="pgbouncer")                           # app is neither admin nor stats
    admin = Admin(pooler)
    assert admin.error("SHOW NOTHING").pgerror.startswith("ERROR:  invalid command 'SHOW NOTHING'")
    assert admin.error("PAUSE; PAUSE").pgcode == "42601"

    # The extended query protocol gets one clear error and the session goes on.
    with RawConn(pooler.host, pooler.port) as raw:
        raw.login(ADMIN, ADMIN_PASSWORD, "pgbouncer")
        raw.send(message(b"P", b"\0SHOW POOLS\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0") +
                 message(b"E", b"\0\0\0\0\0") + message(b"S"))
        kinds = [raw.read_msg()[0] for _ in range(2)]
        assert kinds == ["E", "Z"]
        rows, err = raw.query("SHOW VERSION")
        assert err is None and rows[0][0].startswith("PgBouncer")
    stats.close()
    admin.close()


def test_pgbouncer_user_over_unix_socket_from_own_os_user(pg, pooler_factory, pooler_config,
                                                          app_userlist, tmp_path):
    """As PgBouncer: user `pgbouncer` over the Unix socket, from the pooler's own OS
    user, is an admin without a password (peer credentials); over TCP it is not."""
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    p = pooler_factory(pooler_config(unix_socket_dir=str(sock_dir)), userlist=app_userlist)
    conn = psycopg2.connect(host=str(sock_dir), port=p.port, dbname="pgbouncer", user="pgbouncer",
                            connect_timeout=10)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SHOW VERSION")
        assert cur.fetchone()[0].startswith("PgBouncer")
        cur.execute("PAUSE app")                              # an admin command: full rights
        cur.execute("RESUME app")
    conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=p.port, dbname="pgbouncer", user="pgbouncer",
                         password="guess", connect_timeout=10)
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host=str(sock_dir), port=p.port, dbname="pgbouncer", user=APP_USER,
                         password="wrong", connect_timeout=10)

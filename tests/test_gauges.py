"""SHOW POOLS' gauges (cl_active, cl_waiting, sv_active, sv_idle, sv_used, sv_login,
maxwait) have one definition, Pool.gauges(): one scenario, run against PgBouncer, the
one-process pooler and a prefork pooler (workers=2), must show the same counts, and
with several workers the shared-memory stats must show what SHOW POOLS shows.

The scenario, on one pgbouncer.ini:
- `busy` (pool_size 1, max_db_connections 1): app holds the only server in a
  transaction (active); a second app client asks for a server (waiting); md5user's
  pool has never connected, so its client waits already at login (waiting).
- `rest` (server_check_delay 3s): two servers; one has been idle past the delay
  (used), the other was released just now (idle); both clients stay connected (active).
"""
from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

from bouncer import ADMIN, ADMIN_PASSWORD, PGBOUNCER, Bouncer, require_pgbouncer
from conftest import admin_show, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER, wait_until
from pooler.proc import shm

CHECK_DELAY = 3
GAUGES = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_login")

INI = """\
[databases]
busy = host=127.0.0.1 port={pgport} dbname=app pool_size=1 max_db_connections=1
rest = host=127.0.0.1 port={pgport} dbname=app pool_size=5
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = plain
auth_file = {userlist}
admin_users = admin
pool_mode = transaction
server_check_query = select 1
server_check_delay = %d
query_wait_timeout = 60
{extra}
""" % CHECK_DELAY

# What every implementation must show, per (database, user).
EXPECTED = {
    ("busy", APP_USER): dict(cl_active=1, cl_waiting=1, sv_active=1, sv_idle=0, sv_used=0, sv_login=0),
    ("busy", MD5_USER): dict(cl_active=0, cl_waiting=1, sv_active=0, sv_idle=0, sv_used=0, sv_login=0),
    ("rest", APP_USER): dict(cl_active=2, cl_waiting=0, sv_active=0, sv_idle=1, sv_used=1, sv_login=0),
}


def expected_clients(unlinked: str) -> dict:
    """SHOW CLIENTS lists the same clients in the same states (the login wait as
    waiting). A client linked to no server is `idle` since PgBouncer 1.25, as here;
    `unlinked` says what the PgBouncer at hand (1.18: `active`) calls it."""
    return {("busy", APP_USER): {"active": 1, "waiting": 1},
            ("busy", MD5_USER): {"waiting": 1},
            ("rest", APP_USER): {unlinked: 2}}


def ini(pg, extra: str = "") -> str:
    return INI.replace("{pgport}", str(pg.port)).replace("{extra}", extra)


def users(pg) -> dict[str, str]:
    # md5user's secret as stored, so both poolers log in to PostgreSQL with it.
    return {APP_USER: APP_PASSWORD, MD5_USER: pg.password_secret(MD5_USER), ADMIN: ADMIN_PASSWORD}


def show(target, what: str) -> list[dict]:
    return admin_show(target, what, ADMIN, ADMIN_PASSWORD)


def show_pools(target) -> dict[tuple[str, str], dict]:
    return {(r["database"], r["user"]): r for r in show(target, "POOLS")}


def client_states(target) -> dict[tuple[str, str], dict[str, int]]:
    """SHOW CLIENTS: how many clients of each pool are in each state."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for r in show(target, "CLIENTS"):
        states = out.setdefault((r["database"], r["user"]), {})
        states[r["state"]] = states.get(r["state"], 0) + 1
    return out


def gauges(rows: dict, key: tuple[str, str]) -> dict:
    row = rows.get(key, {})
    return {k: row.get(k) for k in GAUGES}


class Scenario:
    """The clients of the scenario, set up against one target, closed by close()."""

    def __init__(self, target) -> None:
        self.target = target
        self.conns: list = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def connect(self, db: str, user: str = APP_USER, password: str = APP_PASSWORD):
        conn = self.target.connect(db, user, password)
        self.conns.append(conn)
        return conn

    def in_thread(self, fn) -> None:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by close()
                self.errors.append(exc)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def pools(self) -> dict:
        return show_pools(self.target)

    def set_up(self) -> None:
        holder = self.connect("busy")
        holder.cursor().execute("SELECT 1")        # in a transaction: holds busy's one server

        def waiter() -> None:
            # With several workers this client may land where busy/app never connected:
            # then it waits at login instead of at its query; both count as waiting.
            conn = self.connect("busy")
            conn.cursor().execute("SELECT 1")
            conn.commit()
        self.in_thread(waiter)
        self.in_thread(lambda: self.connect("busy", MD5_USER, MD5_PASSWORD))
        wait_until(lambda: gauges(self.pools(), ("busy", APP_USER))["cl_waiting"] == 1 and
                   gauges(self.pools(), ("busy", MD5_USER))["cl_waiting"] == 1, 10,
                   message=f"no waiting clients: {self.pools()}")

        first, second = self.connect("rest"), self.connect("rest")
        first.cursor().execute("SELECT 1")
        second.cursor().execute("SELECT 1")        # two servers, both linked
        first.commit()                             # released: idle, later used
        wait_until(lambda: gauges(self.pools(), ("rest", APP_USER))["sv_used"] == 1,
                   CHECK_DELAY + 3, message=f"no used server: {self.pools()}")
        second.commit()                            # released now: idle

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.close()
            except Exception:
                pass
        for t in self.threads:
            t.join(10)
        assert not any(t.is_alive() for t in self.threads)


def observe(target) -> dict:
    """Run the scenario on `target`; SHOW POOLS' gauges and maxwait per pool."""
    s = Scenario(target)
    try:
        s.set_up()
        rows = s.pools()
        out = {key: gauges(rows, key) for key in EXPECTED}
        for key in EXPECTED:
            out[key]["maxwait_s"] = rows[key]["maxwait"] + rows[key]["maxwait_us"] / 1e6
        states = client_states(target)
        out["clients"] = {key: states.get(key) for key in EXPECTED}
        if hasattr(target, "pid"):
            out["shm"] = shm_pools(target)
        return out
    finally:
        s.close()


def shm_pools(p) -> dict:
    """The pools' gauges in the shared-memory segment (prefork only), once the workers
    have published what SHOW POOLS saw (every 0.2 s)."""
    try:
        seg = shm.Segment.attach(shm.default_path(p.pid))
    except OSError:
        return {}
    try:
        time.sleep(0.5)
        stats = seg.pool_stats()
    finally:
        seg.close()
    return {key: {k: stats.get(key, {}).get(k) for k in GAUGES} for key in EXPECTED}


def check(seen: dict, who: str, login_wait_in_maxwait: bool = True,
          unlinked: str = "idle") -> None:
    for key, want in EXPECTED.items():
        got = {k: seen[key][k] for k in GAUGES}
        assert got == want, f"{who}: SHOW POOLS {key}: {got} != {want}"
    assert seen["clients"] == expected_clients(unlinked), f"{who}: SHOW CLIENTS {seen['clients']}"
    # Two clients of busy have waited since set-up began; nobody waits on rest.
    assert seen[("busy", APP_USER)]["maxwait_s"] >= CHECK_DELAY - 0.5, (who, seen)
    assert seen[("rest", APP_USER)]["maxwait_s"] == 0, (who, seen)
    # PgBouncer times a wait from the client's first query, so a client waiting at
    # login shows maxwait 0 there; ours counts it as waiting (README: drop-in).
    login_wait = seen[("busy", MD5_USER)]["maxwait_s"]
    if login_wait_in_maxwait:
        assert login_wait >= CHECK_DELAY - 0.5, (who, seen)
    else:
        assert login_wait == 0, (who, seen)


def bouncer_version() -> tuple[int, ...]:
    out = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True, timeout=10)
    return tuple(int(x) for x in re.search(r"PgBouncer (\d+)\.(\d+)", out.stdout).groups())


def test_pgbouncer_shows_the_scenario_as_expected(pg):
    """The reference: what EXPECTED says is what PgBouncer itself shows."""
    require_pgbouncer()
    with Bouncer(ini(pg), users(pg)) as bouncer:
        check(observe(bouncer), "pgbouncer", login_wait_in_maxwait=False,
              unlinked="active" if bouncer_version() < (1, 25) else "idle")


@pytest.mark.parametrize("workers", [1, 2])
def test_pooler_gauges_agree_across_process_models(pg, pooler_factory, workers):
    p = pooler_factory(ini(pg, f"workers = {workers}"), userlist=users(pg),
                       filename="pgbouncer.ini")
    if workers > 1:
        wait_until(lambda: p.log().count(") started") >= workers, 15,
                   message=f"workers did not start:\n{p.log()}")
    seen = observe(p)
    check(seen, f"pooler workers={workers}")
    if workers > 1:
        # The segment's per-worker gauges, summed, are SHOW POOLS' (the same definition).
        for key in EXPECTED:
            assert seen["shm"][key] == EXPECTED[key], (key, seen["shm"])

"""Session semantics under transaction pooling for three more real drivers: pg8000,
node-postgres and pgjdbc (psql, psycopg2, psycopg 3 and asyncpg: test_session_state.py).

Each driver runs as a subprocess (tests/drivers/: pg8000_scenario.py, node_scenario.js,
JdbcScenario.java) holding ONE connection, client A, which this file drives a command a
line (`query SQL`, `begin`, `commit`, `rollback`, `notifications MS N`), so the scenario
is written once, here, and is the same for every driver. Between A's steps a second
client B (psycopg2) uses the server. Through the pooler (transaction mode,
default_pool_size 1) B deterministically takes A's only server in between, which the
backend pids prove; the same scenario is then run straight against PostgreSQL and the
observations must be equal to each other and to the expected values.

The NOTIFY comes from a third connection straight to PostgreSQL, in both runs: here the
scenario runs with shared_listen off, so a LISTEN pins A's server (README, "Session state
that cannot be moved"), and with one server a pooled B would wait for it until A's
UNLISTEN. (With shared_listen on, the pool's listening server would take that one server;
test_listen_through_the_shared_hub runs the drivers through the hub with three.)
That the pin is there, and that it is gone after UNLISTEN (B gets the server again), is
checked too.

One difference through the pooler is by design and left out of the comparison: the
protocol-level statements the pooler keeps on a server under its own names (pgjdbc names
COMMIT and ROLLBACK at once, and a PreparedStatement text after prepareThreshold runs)
are listed in pg_prepared_statements for B, so B counts only SQL-level ones (from_sql).

A driver that is not installed fails its test with what to run (bin/setup installs all
three); it is never skipped.
"""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psycopg2
import pytest

from conftest import (REPO_ROOT, APP_DB, APP_PASSWORD, APP_USER, SUPERUSER, SUPERUSER_PASSWORD,
                      PoolerProc, admin_show, wait_until)
from pooler.dev.devcluster import TempPostgres

PgConn = psycopg2.extensions.connection

pytestmark = pytest.mark.timeout(180)

DRIVERS = REPO_ROOT / "tests" / "drivers"
NODE_PREFIX = REPO_ROOT / ".venv" / "node"          # npm install --prefix (bin/setup)
JDBC_JAR = Path("/usr/share/java/postgresql.jar")   # Debian's libpostgresql-jdbc-java
STEP_TIMEOUT = 30.0      # s for one command's answer (a JVM start and compile included)
SETUP_HINT = "run bin/setup (it installs every driver this test needs)"


# ----------------------------------------------------------------- driver runners

def driver_command(driver: str) -> tuple[list[str], dict[str, str]]:
    """The command starting `driver`'s runner and extra environment for it; pytest.fail
    (not skip: a missing driver must not pass unnoticed) when the driver is missing."""
    if driver == "pg8000":
        if importlib.util.find_spec("pg8000") is None:
            pytest.fail(f"pg8000 is not installed in {sys.executable}: {SETUP_HINT} "
                        "(pip install -e '.[test]')")
        return [sys.executable, str(DRIVERS / "pg8000_scenario.py")], {}
    if driver == "node-postgres":
        node = shutil.which("node")
        if node is None:
            pytest.fail(f"node is not installed: {SETUP_HINT} (apt-get install nodejs npm)")
        modules = NODE_PREFIX / "node_modules"
        if not (modules / "pg" / "package.json").is_file():
            pytest.fail(f"node-postgres is not installed in {modules}: {SETUP_HINT} "
                        f"(npm install --prefix {NODE_PREFIX} pg@8.23.1)")
        return [node, str(DRIVERS / "node_scenario.js")], {"NODE_PATH": str(modules)}
    if driver == "pgjdbc":
        java = shutil.which("java")
        if java is None or not JDBC_JAR.is_file():
            pytest.fail(f"java or {JDBC_JAR} is missing: {SETUP_HINT} "
                        "(apt-get install default-jre-headless libpostgresql-jdbc-java)")
        return [java, "-cp", str(JDBC_JAR), str(DRIVERS / "JdbcScenario.java")], {}
    raise ValueError(driver)


class Runner:
    """A driver runner subprocess: `ask(line)` sends one command and returns the value
    of its JSON answer, within STEP_TIMEOUT (else the runner is killed and the test
    fails with its stderr)."""

    def __init__(self, driver: str, host: str, port: int, tmp_path: Path):
        cmd, extra = driver_command(driver)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGHOST": host,
               "PGPORT": str(port), "PGDATABASE": APP_DB, "PGUSER": APP_USER,
               "PGPASSWORD": APP_PASSWORD, "PGCONNECT_TIMEOUT": "20", **extra}
        self.driver = driver
        self.stderr_path = tmp_path / f"{driver}-{port}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, cwd=REPO_ROOT, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        # A reader thread, so that a runner that hangs is noticed by a queue timeout.
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _fail(self, what: str) -> None:
        self.kill()
        pytest.fail(f"{self.driver}: {what}; stderr:\n{self.stderr_path.read_text()}")

    def ask(self, line: str) -> object:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail(f"runner exited (rc {self.proc.poll()}) before {line!r}")
        try:
            answer = self.lines.get(timeout=STEP_TIMEOUT)
        except queue.Empty:
            self._fail(f"no answer to {line!r} within {STEP_TIMEOUT}s")
        if answer is None:
            self.proc.wait(10)
            self._fail(f"runner exited (rc {self.proc.returncode}) on {line!r}")
        reply = json.loads(answer)
        if "error" in reply:
            self._fail(f"{line!r} failed: {reply['error']}")
        return reply["value"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(STEP_TIMEOUT)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ----------------------------------------------------------------- the scenario

def one(conn: PgConn, sql: str) -> object:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0] if cur.description else None


# SQL-level statements only: the protocol-level ones that the pooler keeps on a server
# under its own names (prepared.py; pgjdbc's after prepareThreshold) are listed in
# pg_prepared_statements for whoever has the server next, as under PgBouncer.
PREPARED_BY_SQL = "SELECT count(*)::int FROM pg_prepared_statements WHERE from_sql"

# (who, step, value): A the driver under test, B the psycopg2 client in between.
EXPECTED = [
    ("A", "SET work_mem = '3MB'", None),
    ("B", "SHOW work_mem", "4MB"),                     # A's SET does not leak ...
    ("A", "SHOW work_mem", "3MB"),                     # ... and is still A's
    ("A", "begin", None),
    ("A", "SET work_mem = '1MB'", None),
    ("A", "SHOW work_mem", "1MB"),
    ("A", "rollback", None),
    ("B", "SHOW work_mem", "4MB"),
    ("A", "SHOW work_mem", "3MB"),                     # the rolled-back SET is gone
    ("A", "begin", None),
    ("A", "SET LOCAL work_mem = '2MB'", None),
    ("A", "SHOW work_mem", "2MB"),
    ("A", "commit", None),
    ("B", "SHOW work_mem", "4MB"),
    ("A", "SHOW work_mem", "3MB"),                     # SET LOCAL lasted one transaction
    ("A", "PREPARE p AS SELECT $1::int + 1", None),
    ("B", PREPARED_BY_SQL, 0),                         # A's PREPARE p is A's alone
    ("A", "EXECUTE p(41)", 42),                        # after B used the server
    ("A", "LISTEN ch", None),
    ("N", "SELECT pg_notify('ch', 'from another client')", ""),
    ("A", "notifications 10000 1", [["ch", "from another client"]]),
    ("A", "UNLISTEN *", None),
    ("B", "SELECT count(*)::int FROM pg_listening_channels()", 0),
    ("B", "SHOW work_mem", "4MB"),
    ("A", "SELECT count(*)::int FROM pg_listening_channels()", 0),
    ("A", "SHOW work_mem", "3MB"),
    ("A", "EXECUTE p(1)", 2),
    ("A", "DEALLOCATE p", None),
    ("B", PREPARED_BY_SQL, 0),
]


def run_scenario(a: Runner, b: PgConn, notifier: PgConn,
                 after_listen: Callable[[], None]) -> tuple[list, dict]:
    """EXPECTED's steps, each by its client: the observations (who, step, value), and the
    backend pid of A and of B at each of B's steps."""
    seen: list[tuple] = []
    pids: dict[str, list[int]] = {"A": [], "B": []}
    for who, step, _ in EXPECTED:
        if who == "A":
            value = a.ask(step if step.split()[0] in ("begin", "commit", "rollback",
                                                     "notifications") else f"query {step}")
            if step == "LISTEN ch":
                after_listen()
        elif who == "B":
            pids["A"].append(a.ask("query SELECT pg_backend_pid()"))
            value = one(b, step)
            pids["B"].append(one(b, "SELECT pg_backend_pid()"))
        else:
            value = one(notifier, step)
        seen.append((who, step, value))
    return seen, pids


def tx_pooler(pooler_factory, pooler_config, app_userlist: dict[str, str],
              **overrides) -> PoolerProc:
    # One server: B must take A's server between A's steps. query_wait_timeout bounds
    # how long a B that cannot get it (say, a pin never released) would wait. The
    # scenario's LISTEN pins (shared_listen off): with one server, the shared listener
    # would hold it (it counts in pool_size); test_listen_through_the_shared_hub covers it.
    cfg = pooler_config(**{"pool_mode": "transaction", "default_pool_size": 1,
                           "query_wait_timeout": 20, "admin_users": [SUPERUSER],
                           "shared_listen": False, **overrides})
    return pooler_factory(cfg, app_userlist)


def connect_direct(pg: TempPostgres) -> PgConn:
    c = psycopg2.connect(host=pg.host, port=pg.port, dbname=APP_DB, user=APP_USER,
                         password=APP_PASSWORD, connect_timeout=10)
    c.autocommit = True
    return c


def observe(driver: str, host: str, port: int, connect_b: Callable[[], PgConn], pg: TempPostgres,
            tmp_path: Path, after_listen: Callable[[], None]) -> tuple[list, dict]:
    a = Runner(driver, host, port, tmp_path)
    b = notifier = None
    try:
        b = connect_b()
        b.autocommit = True
        notifier = connect_direct(pg)
        return run_scenario(a, b, notifier, after_listen)
    finally:
        a.close()
        for c in (b, notifier):
            if c is not None:
                c.close()


@pytest.mark.parametrize("driver", ["pg8000", "node-postgres", "pgjdbc"])
def test_driver_keeps_session_semantics_through_transaction_pooling(
        driver, pg, pooler_factory, pooler_config, app_userlist, tmp_path):
    started = time.monotonic()
    p = tx_pooler(pooler_factory, pooler_config, app_userlist)

    def listen_pins() -> None:
        def pins() -> list[str]:
            return [c["pin"] for c in admin_show(p, "SHOW CLIENTS", SUPERUSER, SUPERUSER_PASSWORD)
                    if c["database"] == APP_DB]
        # Read back just after A got its answer: wait for it.
        wait_until(lambda: "LISTEN" in pins(), timeout=10,
                   message=f"LISTEN did not pin A's server: {pins()}")

    pooled, pooled_pids = observe(driver, p.host, p.port, p.connect, pg, tmp_path, listen_pins)
    direct, direct_pids = observe(driver, pg.host, pg.port, lambda: connect_direct(pg), pg,
                                  tmp_path, lambda: None)

    assert pooled == direct
    assert pooled == EXPECTED
    # Through the pooler one server served A and B throughout: B really came in between.
    assert len(set(pooled_pids["A"] + pooled_pids["B"])) == 1, pooled_pids
    # (and straight to PostgreSQL they are two sessions, as they should be)
    assert not set(direct_pids["A"]) & set(direct_pids["B"]), direct_pids
    if driver == "pgjdbc":
        # Its named statements (prepared.py) were Bound again in later transactions,
        # after B had used the server: more Binds than Parses of named statements.
        def stats() -> dict:
            [row] = [r for r in admin_show(p, "SHOW STATS", SUPERUSER, SUPERUSER_PASSWORD)
                     if r["database"] == APP_DB]
            return row
        wait_until(lambda: stats()["total_bind_count"] > stats()["total_client_parse_count"] > 0,
                   timeout=10, message=f"no named statement was reused: {stats()}")
    print(f"{driver}: {time.monotonic() - started:.1f}s")


@pytest.mark.parametrize("driver", ["pg8000", "node-postgres", "pgjdbc"])
def test_listen_through_the_shared_hub(driver, pg, pooler_factory, pooler_config, app_userlist,
                                       tmp_path):
    """shared_listen (the default): a driver's LISTEN is held by the pool's listening
    server when the driver sends it as a lone simple Query (pg8000, node-postgres), so
    it pins nothing and a NOTIFY from another pooled client reaches it; pgjdbc sends
    it in the extended protocol, which the pooler does not take over: it pins, as
    before, and is delivered all the same."""
    p = tx_pooler(pooler_factory, pooler_config, app_userlist, default_pool_size=3,
                  shared_listen=True)
    a = Runner(driver, p.host, p.port, tmp_path)
    b = p.connect()
    b.autocommit = True
    try:
        assert a.ask("query LISTEN hub_ch") is None

        def pins() -> list[str]:
            return sorted(c["pin"] for c in admin_show(p, "SHOW CLIENTS", SUPERUSER,
                                                        SUPERUSER_PASSWORD)
                          if c["database"] == APP_DB)
        want = ["", "LISTEN"] if driver == "pgjdbc" else ["", ""]
        wait_until(lambda: pins() == want, timeout=10, message=f"pins: {pins()}")
        one(b, "NOTIFY hub_ch, 'via the pooler'")
        assert a.ask("notifications 10000 1") == [["hub_ch", "via the pooler"]]
        assert a.ask("query SELECT 6 * 7") == 42          # and it still runs queries
        assert a.ask("query UNLISTEN *") is None
    finally:
        a.close()
        b.close()

"""Shared fixtures: a real PostgreSQL (no mocks) and pooler subprocesses.

Fixtures
    pg              session: a running TempPostgres with roles app/apppass (SCRAM),
                    md5user/md5pass (md5-stored), postgres/postgres (superuser) and a
                    database `app` owned by app.
    pooler_factory  function: start(config, userlist=None, extra_args=[], expect_fail=False)
                    -> PoolerProc; every pooler started is stopped at test end.
    pooler_config   function: a callable giving a base config dict for `pg`.

Helpers (import with `from conftest import backend_count, Poller, ...`)
    backend_count(pg, dbname, user=None) -> int
    Poller(fn, interval=0.02)  context manager recording fn()'s max in a thread
    wait_until(predicate, timeout=10, interval=0.02, message=None)
    run_threads(target, args_list, timeout=60)  target(*args) in parallel threads;
                    AssertionError if one hangs or raises
    direct_conn(pg, db, user) / app_direct(pg) / superuser_conn(pg)
                    context managers: autocommit psycopg2 connections straight to `pg`
    raw_client(port, user=app, database=app, password=None, **params) -> rawpg.RawConn
                    logged in to 127.0.0.1:port (password None: trust)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pooler.dev.devcluster import TempPostgres, free_port  # noqa: E402
from rawpg import RawConn  # noqa: E402

APP_USER, APP_PASSWORD = "app", "apppass"
MD5_USER, MD5_PASSWORD = "md5user", "md5pass"
SUPERUSER, SUPERUSER_PASSWORD = "postgres", "postgres"
APP_DB = "app"

START_TIMEOUT = 20.0
KILL_AFTER = 5.0


# --------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="session")
def pg():
    cluster = TempPostgres().start()
    try:
        cluster.create_role(APP_USER, APP_PASSWORD)
        cluster.create_role(MD5_USER, MD5_PASSWORD, md5=True)
        cluster.create_database(APP_DB, owner=APP_USER)
        # md5user may use the app database too.
        cluster.psql(f'GRANT ALL ON SCHEMA public TO "{MD5_USER}"', db=APP_DB)
        yield cluster
    finally:
        _close_stat_conn(cluster)
        cluster.stop()


_stat_conns: dict[int, tuple[threading.Lock, "psycopg2.extensions.connection"]] = {}
_stat_conns_lock = threading.Lock()


def _stat_conn(pg: TempPostgres):
    """One autocommit superuser connection per cluster (over the Unix socket)."""
    with _stat_conns_lock:
        entry = _stat_conns.get(id(pg))
        if entry is None or entry[1].closed:
            conn = psycopg2.connect(pg.unix_dsn("postgres", "postgres",
                                                application_name="pytest-stats"))
            conn.autocommit = True
            entry = (threading.Lock(), conn)
            _stat_conns[id(pg)] = entry
        return entry


def _close_stat_conn(pg: TempPostgres) -> None:
    with _stat_conns_lock:
        entry = _stat_conns.pop(id(pg), None)
    if entry:
        try:
            entry[1].close()
        except Exception:
            pass


def backend_count(pg: TempPostgres, dbname: str, user: str | None = None) -> int:
    """Client backends connected to `dbname` (and as `user`, if given), from
    pg_stat_activity, not counting the session that asks."""
    lock, conn = _stat_conn(pg)
    sql = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
           "AND pid <> pg_backend_pid() AND datname = %s")
    params: list = [dbname]
    if user is not None:
        sql += " AND usename = %s"
        params.append(user)
    with lock:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()[0]


class Poller:
    """Calls `fn` every `interval` seconds in a background thread while the
    `with` block runs; `.max`, `.last`, `.samples` hold what it returned.

        with Poller(lambda: backend_count(pg, "app")) as p:
            ...load...
        assert p.max <= 5

    An exception from `fn` stops polling and is re-raised when the block exits."""

    def __init__(self, fn, interval: float = 0.02):
        self.fn = fn
        self.interval = interval
        self.samples: list = []
        self.max = None
        self.last = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="Poller", daemon=True)

    def _sample(self) -> None:
        v = self.fn()
        self.samples.append(v)
        self.last = v
        if self.max is None or v > self.max:
            self.max = v

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except BaseException as e:  # noqa: BLE001 - reported on exit
                self.error = e
                return

    def __enter__(self) -> "Poller":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join(5)
        if exc_type is None:
            if self.error is not None:
                raise self.error
            self._sample()


def admin_show(target, what: str, user: str = "admin", password: str | None = "adminpass",
               **extra) -> list[dict]:
    """`SHOW what` on the admin console of `target` (a PoolerProc or a bouncer.Bouncer:
    anything with connect(db, user, password, **extra)) as a list of column -> value."""
    conn = target.connect("pgbouncer", user, password, **extra)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(what if what.lstrip().upper().startswith("SHOW ") else f"SHOW {what}")
            names = [d.name for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        conn.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str | None = None):
    """Poll `predicate` until it returns something truthy (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def run_threads(target, args_list, timeout: float = 60.0, what: str = "threads") -> None:
    """Call target(*args) for every args in `args_list`, each in its own thread, all
    started at once, and join each for up to `timeout` s. AssertionError if one is
    still running, or if any raised (the first exception is chained)."""
    errors: list[BaseException] = []

    def run(*args) -> None:
        try:
            target(*args)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=tuple(a), daemon=True) for a in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    hung = sum(t.is_alive() for t in threads)
    assert not hung, f"{hung} of {len(threads)} {what} still running after {timeout}s"
    if errors:
        raise AssertionError(f"{len(errors)} of {len(threads)} {what} failed, "
                             f"first: {errors[0]!r}") from errors[0]


@contextlib.contextmanager
def direct_conn(pg: TempPostgres, db: str, user: str, **extra):
    """A direct (not pooled) autocommit psycopg2 connection over the Unix socket,
    closed on exit; `extra` goes into the DSN (application_name=...)."""
    conn = psycopg2.connect(pg.unix_dsn(db, user, **extra))
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def app_direct(pg: TempPostgres):
    """direct_conn as app to the app database (closed on exit: tests count the app
    database's backends, so it must not linger)."""
    return direct_conn(pg, APP_DB, APP_USER)


def superuser_conn(pg: TempPostgres, **extra):
    """direct_conn as the superuser to the postgres database."""
    return direct_conn(pg, "postgres", SUPERUSER, **extra)


def raw_client(port: int, user: str = APP_USER, database: str = APP_DB,
               password: str | None = None, *, host: str = "127.0.0.1", timeout: float = 20.0,
               **params: str) -> RawConn:
    """A rawpg.RawConn logged in to host:port (password None: trust auth, an
    AssertionError if one is asked for); `params` are extra startup parameters.
    Raises rawpg.PgError if the login is refused (the socket is closed then)."""
    conn = RawConn(host, port, timeout)
    try:
        conn.login(user, password, database, **params)
    except BaseException:
        conn.close()
        raise
    return conn


# -------------------------------------------------------------------------- pooler
def _dsn(host: str, port: int, db: str, user: str, password: str | None, **extra) -> str:
    def q(v) -> str:
        s = str(v)
        if s and not re.search(r"[\s'\\]", s):
            return s
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
    parts = {"host": host, "port": port, "dbname": db, "user": user}
    if password is not None:
        parts["password"] = password
    parts.update(extra)
    return " ".join(f"{k}={q(v)}" for k, v in parts.items())


def write_userlist(path: Path, users: dict[str, str]) -> None:
    """PgBouncer userlist.txt: one `"user" "secret"` per line, `"` doubled inside."""
    def q(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'
    path.write_text("".join(f"{q(u)} {q(s)}\n" for u, s in users.items()))


class PoolerProc:
    """A pooler subprocess (`python -m pooler [extra_args] CONFIG`)."""

    def __init__(self, proc: subprocess.Popen, port: int, host: str, config_path: Path,
                 log_path: Path, userlist_path: Path | None):
        self.proc = proc
        self.port = port
        self.host = host
        self.config_path = config_path
        self.log_path = log_path
        self.userlist_path = userlist_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match:
        """Wait until regex `pattern` appears in the log (from offset `start`)."""
        rx = re.compile(pattern)
        found = wait_until(lambda: rx.search(self.log(), start), timeout,
                           message=f"{pattern!r} not in pooler log within {timeout}s")
        return found

    def dsn(self, db: str = APP_DB, user: str = APP_USER, password: str | None = APP_PASSWORD,
            **extra) -> str:
        """libpq DSN to the pooler; extra keywords (connect_timeout=5, ...) are appended."""
        return _dsn(self.host, self.port, db, user, password, **extra)

    def uri(self, db: str = APP_DB, user: str = APP_USER, password: str = APP_PASSWORD) -> str:
        from urllib.parse import quote
        return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
                f"@{self.host}:{self.port}/{quote(db, safe='')}")

    def connect(self, db: str = APP_DB, user: str = APP_USER, password: str | None = APP_PASSWORD,
                **extra):
        """A psycopg2 connection through the pooler (connect_timeout 10 unless given)."""
        extra.setdefault("connect_timeout", 10)
        return psycopg2.connect(self.dsn(db, user, password, **extra))

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def reload(self) -> None:
        """SIGHUP: reload the config."""
        self.send_signal(signal.SIGHUP)

    def update_config(self, changes: dict, reload: bool = True) -> dict:
        """Merge `changes` (top level) into the YAML config file, then SIGHUP if `reload`."""
        cfg = yaml.safe_load(self.config_path.read_text()) or {}
        cfg.update(changes)
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if reload:
            self.reload()
        return cfg

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        """Send `sig` and wait up to `timeout` s for exit; return the exit code
        (negative: killed by that signal). On timeout: SIGKILL it and its process
        group, then raise TimeoutError with the log."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(f"pooler pid {self.pid} did not exit within {timeout}s of "
                                   f"signal {signal.Signals(sig).name}; log:\n{self.log()}")
        self._reap_group()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the pooler's whole process group (master and workers)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def _reap_group(self) -> None:
        # Workers left behind by a master that exited: the group is ours alone
        # (start_new_session), so kill what is left of it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __repr__(self) -> str:
        return f"<PoolerProc pid={self.pid} port={self.port} rc={self.returncode}>"


def _wait_listening(p: PoolerProc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rc = p.proc.poll()
        if rc is not None:
            raise RuntimeError(f"pooler exited with code {rc} before listening on "
                               f"{p.host}:{p.port}; log ({p.log_path}):\n{p.log()}")
        try:
            with socket.create_connection((p.host, p.port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            log = p.log()
            p.kill()
            raise RuntimeError(f"pooler not accepting on {p.host}:{p.port} within {timeout}s; "
                               f"log ({p.log_path}):\n{log}")
        time.sleep(0.05)


@pytest.fixture
def pooler_factory(tmp_path: Path):
    """start(config, userlist=None, extra_args=[], expect_fail=False, *, port=None,
    filename=None, env=None) -> PoolerProc

    config: a dict (written as YAML; `listen_port` <- a free port and `listen_addr`
    <- 127.0.0.1 unless given; with `userlist`, `auth.file` <- the userlist written
    in userlist.txt format and `auth.type` <- scram-sha-256 unless given), or a str
    written verbatim (e.g. a pgbouncer.ini with filename="pgbouncer.ini"), in which
    `{port}` and `{userlist}` are replaced.

    Waits (20 s) until the port accepts TCP, else raises with the log. With
    expect_fail=True it instead waits (20 s) for the process to exit and returns it
    (check .returncode and .log()); it raises if the pooler keeps running.
    """
    procs: list[PoolerProc] = []
    counter = [0]

    def start(config, userlist: dict[str, str] | None = None, extra_args: list[str] = (),
              expect_fail: bool = False, *, port: int | None = None,
              filename: str | None = None, env: dict[str, str] | None = None) -> PoolerProc:
        counter[0] += 1
        n = counter[0]
        userlist_path = None
        if userlist is not None:
            userlist_path = tmp_path / f"userlist-{n}.txt"
            write_userlist(userlist_path, userlist)

        if isinstance(config, str):
            port = port or free_port()
            host = "127.0.0.1"
            text = config.replace("{port}", str(port))
            if userlist_path:
                text = text.replace("{userlist}", str(userlist_path))
            config_path = tmp_path / (filename or f"pooler-{n}.yaml")
            config_path.write_text(text)
        else:
            cfg = dict(config)
            cfg.setdefault("listen_addr", "127.0.0.1")
            if port is not None:
                cfg["listen_port"] = port
            cfg.setdefault("listen_port", free_port())
            port = int(cfg["listen_port"])
            if userlist_path:
                auth = dict(cfg.get("auth") or {})
                auth.setdefault("type", "scram-sha-256")
                auth["file"] = str(userlist_path)
                cfg["auth"] = auth
            host = str(cfg["listen_addr"])
            if host in ("", "*", "0.0.0.0"):
                host = "127.0.0.1"
            config_path = tmp_path / (filename or f"pooler-{n}.yaml")
            config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

        log_path = tmp_path / f"pooler-{n}.log"
        run_env = dict(os.environ)
        run_env["PYTHONUNBUFFERED"] = "1"
        run_env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([run_env["PYTHONPATH"]] if run_env.get("PYTHONPATH") else []))
        if env:
            run_env.update(env)
        cmd = [sys.executable, "-m", "pooler", *extra_args, str(config_path)]
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=tmp_path, env=run_env,
                                    start_new_session=True)
        p = PoolerProc(proc, port, host, config_path, log_path, userlist_path)
        procs.append(p)

        if expect_fail:
            try:
                proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                raise AssertionError(f"pooler was expected to fail but was still running after "
                                     f"{START_TIMEOUT}s; log:\n{p.log()}") from None
            return p
        _wait_listening(p, START_TIMEOUT)
        return p

    yield start

    for p in procs:
        if p.proc.poll() is None:
            try:
                os.kill(p.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + KILL_AFTER
    for p in procs:
        try:
            p.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        p.kill()


@pytest.fixture
def pooler_config(pg):
    """make(**overrides) -> a base pooler config dict for `pg`: databases `app`
    and `postgres` pointing at it, everything else default. Top-level keys in
    overrides replace the base ones."""
    def make(**overrides) -> dict:
        cfg = {
            "databases": {
                APP_DB: {"host": pg.host, "port": pg.port, "dbname": APP_DB},
                "postgres": {"host": pg.host, "port": pg.port, "dbname": "postgres"},
            },
        }
        cfg.update(overrides)
        return cfg
    return make


@pytest.fixture
def app_userlist() -> dict[str, str]:
    """Plaintext userlist for the standard roles."""
    return {APP_USER: APP_PASSWORD, MD5_USER: MD5_PASSWORD, SUPERUSER: SUPERUSER_PASSWORD}

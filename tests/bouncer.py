"""The real PgBouncer, run side by side with the pooler as the reference.

    with Bouncer(ini_text, userlist={"app": "apppass"}) as b:
        psycopg2.connect(b.dsn("app", "app", "apppass"))

`ini_text` may use {port} and {userlist}, as pooler_factory's ini configs do,
so one text configures both. As root, PgBouncer runs as the `postgres` OS user
(it refuses root), from a directory that user can read.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from conftest import APP_DB, APP_PASSWORD, APP_USER, MD5_USER, write_userlist
from pooler.dev.devcluster import free_port

PGBOUNCER = os.environ.get("PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
START_TIMEOUT = 10.0
ADMIN, ADMIN_PASSWORD = "admin", "adminpass"
STATS, STATS_PASSWORD = "stats", "statspass"


def require_pgbouncer() -> None:
    if not os.access(PGBOUNCER, os.X_OK):
        pytest.skip(f"PgBouncer not installed ({PGBOUNCER})")


class Bouncer:
    def __init__(self, ini: str, userlist: dict[str, str] | None = None) -> None:
        require_pgbouncer()
        self.dir = Path(tempfile.mkdtemp(prefix="pooler-test-pgb-"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.ini_path = self.dir / "pgbouncer.ini"
        self.log_path = self.dir / "pgbouncer.log"
        self.userlist_path = self.dir / "userlist.txt"
        write_userlist(self.userlist_path, userlist or {})
        self.write_ini(ini)
        self.proc: subprocess.Popen | None = None

    def write_ini(self, ini: str) -> None:
        """(Re)write the ini; RELOAD on the console makes PgBouncer read it."""
        text = ini.replace("{port}", str(self.port)).replace("{userlist}", str(self.userlist_path))
        self.ini_path.write_text(text)
        self._give_to_postgres()

    def _give_to_postgres(self) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres", str(self.dir)], check=True)

    def start(self) -> "Bouncer":
        cmd = [PGBOUNCER, str(self.ini_path)]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited ({self.proc.returncode}):\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer not listening:\n{self.log()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def dsn(self, db: str, user: str, password: str | None = None, **extra) -> str:
        parts = {"host": "127.0.0.1", "port": self.port, "dbname": db, "user": user,
                 "connect_timeout": 10, **extra}
        if password is not None:
            parts["password"] = password
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect(self, db: str, user: str, password: str | None = None, **extra):
        return psycopg2.connect(self.dsn(db, user, password, **extra))

    def __enter__(self) -> "Bouncer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- side by side

SIDE_INI = """\
[databases]
app = host=127.0.0.1 port={pgport} dbname=app pool_size=2
{star}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = {auth_type}
auth_file = {userlist}
admin_users = admin
stats_users = stats
pool_mode = transaction
"""


def side_ini(pg, auth_type: str, star: bool = False) -> str:
    return SIDE_INI.replace("{pgport}", str(pg.port)).replace("{auth_type}", auth_type) \
        .replace("{star}", f"* = host=127.0.0.1 port={pg.port}" if star else "")


def reconfigure(pg, side_by_side, auth_type: str, star: bool = False) -> None:
    """Rewrite the ini of both and RELOAD it on their consoles."""
    bouncer, pooler = side_by_side
    bouncer.write_ini(side_ini(pg, auth_type, star))
    pooler.config_path.write_text(side_ini(pg, auth_type, star).replace("{port}", str(pooler.port))
                                  .replace("{userlist}", str(pooler.userlist_path)))
    for target in side_by_side:
        admin_query(target, "RELOAD")


@pytest.fixture
def side_by_side(pg, pooler_factory):
    """(PgBouncer, pooler) running the same ini and userlist (md5user's secret as stored)."""
    require_pgbouncer()
    users = {APP_USER: APP_PASSWORD, MD5_USER: pg.password_secret(MD5_USER), ADMIN: ADMIN_PASSWORD,
             STATS: STATS_PASSWORD}
    bouncer = Bouncer(side_ini(pg, "plain"), users).start()
    try:
        pooler = pooler_factory(side_ini(pg, "plain"), userlist=users, filename="pgbouncer.ini")
        yield bouncer, pooler
    finally:
        bouncer.stop()


def connect(target, db: str, user: str, password: str | None):
    """A psycopg2 connection through PgBouncer or the pooler (same signature)."""
    return target.connect(db, user, password)


def admin_query(target, sql: str) -> list[tuple]:
    conn = connect(target, "pgbouncer", ADMIN, ADMIN_PASSWORD)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def pool_row(target, db: str, user: str) -> dict:
    conn = connect(target, "pgbouncer", ADMIN, ADMIN_PASSWORD)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SHOW POOLS")
            names = [d.name for d in cur.description]
            for row in cur.fetchall():
                if row[0] == db and row[1] == user:
                    return dict(zip(names, row))
        return {}
    finally:
        conn.close()


def pool_counts(target) -> tuple:
    row = pool_row(target, APP_DB, APP_USER)
    return row.get("cl_active"), row.get("cl_waiting"), row.get("sv_active")


def hold_transactions(target, n: int, release: threading.Event) -> list[threading.Thread]:
    """n clients, each in a transaction until `release` (beyond the pool size, they wait)."""
    def one() -> None:
        conn = connect(target, APP_DB, APP_USER, APP_PASSWORD)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            release.wait(20)
            conn.commit()
        finally:
            conn.close()
    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def login_ok(target, db: str, user: str, password: str | None) -> bool:
    try:
        conn = connect(target, db, user, password)
    except psycopg2.OperationalError:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        return True
    except psycopg2.Error:
        return False
    finally:
        conn.close()



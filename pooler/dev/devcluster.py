"""A throwaway PostgreSQL cluster for tests, the demo and the benchmark.

    with TempPostgres() as pg:
        pg.create_role("app", "apppass")
        pg.create_database("app", owner="app")
        psycopg2.connect(pg.dsn("app", "app", "apppass"))

The cluster lives in a fresh directory under the system temp dir (data
directory, Unix socket and server log), listens on 127.0.0.1 only, on a free
port unless one is given, and is tuned for speed, not durability.  As root it
runs as the ``postgres`` OS user (initdb refuses root).

Authentication: Unix socket ``trust``; TCP from 127.0.0.1 ``md5``.  The ``md5``
method accepts both kinds of stored password: a SCRAM-stored one is
authenticated with SCRAM-SHA-256, an md5-stored one with md5.  So roles made
with ``create_role(..., md5=False)`` (the default) log in over TCP with SCRAM
and roles made with ``md5=True`` with md5, from the same pg_hba line.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

__all__ = ["TempPostgres", "PostgresError", "find_pg_bindir", "free_port"]

_READY_TIMEOUT = 60.0
# libpq environment variables that would redirect or alter our own psql/pg_ctl calls.
_PG_ENV_DROP = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD",
                "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGDATA",
                "PGSSLMODE", "PGREQUIRESSL", "PGTARGETSESSIONATTRS", "PGAPPNAME")


class PostgresError(RuntimeError):
    """A command against the temporary cluster failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_pg_bindir() -> str:
    """The bin directory of the newest installed PostgreSQL server.

    Order: $PG_BINDIR, /usr/lib/postgresql/<highest>/bin, `pg_config --bindir`,
    the directory of an `initdb` on PATH.
    """
    env = os.environ.get("PG_BINDIR")
    if env:
        if not os.path.isfile(os.path.join(env, "initdb")):
            raise PostgresError(f"PG_BINDIR={env!r} has no initdb")
        return env

    def version_key(path: str) -> tuple:
        ver = os.path.basename(os.path.dirname(path))
        return tuple(int(p) if p.isdigit() else 0 for p in ver.split("."))

    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
                  if os.path.isfile(os.path.join(d, "initdb"))]
    if candidates:
        return max(candidates, key=version_key)

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            d = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                               check=True).stdout.strip()
            if os.path.isfile(os.path.join(d, "initdb")):
                return d
        except (OSError, subprocess.CalledProcessError):
            pass
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise PostgresError(
        "no PostgreSQL server binaries found (looked for /usr/lib/postgresql/*/bin/initdb, "
        "pg_config --bindir, initdb on PATH). Install them with bin/setup "
        "(apt-get install postgresql-15) or set PG_BINDIR.")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _dsn_value(value) -> str:
    s = str(value)
    if s and not re.search(r"[\s'\\]", s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conf_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return str(value)
    return _quote_literal(str(value))


class TempPostgres:
    host: str = "127.0.0.1"

    def __init__(self, port: int | None = None, bindir: str | None = None,
                 extra_conf: dict[str, str] | None = None,
                 extra_hba: list[str] | None = None, *, ssl_cert_file: str | None = None,
                 ssl_key_file: str | None = None):
        """`extra_conf`: postgresql.conf settings added after ours (they win).
        `extra_hba`: pg_hba.conf lines put before ours (first match wins).
        `ssl_cert_file` / `ssl_key_file`: turn on `ssl` with this certificate and key
        (copied into the data directory, readable by the server only); default off."""
        if bool(ssl_cert_file) != bool(ssl_key_file):
            raise ValueError("ssl_cert_file and ssl_key_file go together")
        self.ssl_files = (ssl_cert_file, ssl_key_file) if ssl_cert_file else None
        self._requested_port = port
        self.port: int = port or 0
        self.bindir = bindir or find_pg_bindir()
        self.extra_conf = dict(extra_conf or {})
        self.extra_hba = list(extra_hba or [])
        self.basedir: str | None = None
        self.datadir: str | None = None
        self.socket_dir: str | None = None
        self.logfile: str | None = None
        self._running = False
        self._owner_pid = os.getpid()
        self._run_as = self._os_user()

    # ------------------------------------------------------------------ utils
    @staticmethod
    def _os_user() -> str | None:
        """The OS user to run the server as (None: ourselves)."""
        if os.geteuid() != 0:
            return None
        user = os.environ.get("POOLER_PG_OS_USER", "postgres")
        try:
            import pwd
            pwd.getpwnam(user)
        except KeyError:
            raise PostgresError(
                f"running as root and there is no OS user {user!r} to run PostgreSQL as "
                "(initdb refuses root); create it or run as a normal user") from None
        return user

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _PG_ENV_DROP}
        env["LC_ALL"] = env.get("LC_ALL") or "C.UTF-8"
        return env

    def _bin(self, name: str) -> str:
        path = os.path.join(self.bindir, name)
        if os.path.isfile(path):
            return path
        found = shutil.which(name)
        if found:
            return found
        raise PostgresError(f"{name} not found in {self.bindir} nor on PATH")

    def _server_cmd(self, args: list[str]) -> list[str]:
        if self._run_as:
            return ["runuser", "-u", self._run_as, "--", *args]
        return args

    def _run(self, args: list[str], as_server: bool = False, timeout: float = 120,
             input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = self._server_cmd(args) if as_server else args
        try:
            cp = subprocess.run(cmd, capture_output=True, text=True, env=self._env(),
                                cwd=self.basedir or "/", timeout=timeout, input=input,
                                stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise PostgresError(f"timed out after {timeout}s: {' '.join(cmd)}") from e
        if check and cp.returncode != 0:
            raise PostgresError(
                f"command failed (exit {cp.returncode}): {' '.join(cmd)}\n"
                f"{cp.stdout}{cp.stderr}".rstrip())
        return cp

    def server_log(self) -> str:
        if self.logfile and os.path.exists(self.logfile):
            with open(self.logfile, errors="replace") as f:
                return f.read()
        return ""

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "TempPostgres":
        if self._running:
            return self
        self.basedir = tempfile.mkdtemp(prefix="pooler-pg-")
        os.chmod(self.basedir, 0o700)
        if self._run_as:
            import pwd
            pw = pwd.getpwnam(self._run_as)
            os.chown(self.basedir, pw.pw_uid, pw.pw_gid)
        self.datadir = os.path.join(self.basedir, "data")
        self.socket_dir = self.basedir
        self.logfile = os.path.join(self.basedir, "postgres.log")
        self._owner_pid = os.getpid()
        atexit.register(self.stop)
        try:
            self._initdb()
            attempts = 1 if self._requested_port else 5
            for attempt in range(attempts):
                self.port = self._requested_port or free_port()
                self._write_conf()
                if self._pg_ctl_start():
                    break
                log = self.server_log()
                if "could not bind" in log or "already in use" in log:
                    if attempt + 1 < attempts:
                        continue    # lost the race for a free port; try another
                raise PostgresError(f"PostgreSQL did not start on port {self.port}; "
                                    f"server log:\n{log[-4000:]}")
            self._running = True
            self._wait_ready()
            self.psql("ALTER ROLE postgres PASSWORD 'postgres'")
        except BaseException:
            self.stop()
            raise
        return self

    def _initdb(self) -> None:
        self._run([self._bin("initdb"), "-D", self.datadir, "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                  as_server=True)

    def _write_conf(self) -> None:
        conf = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": self.socket_dir,
            "max_connections": 300,
            "shared_buffers": "128MB",
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "password_encryption": "scram-sha-256",
            "logging_collector": False,
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "max_wal_size": "1GB",
            "checkpoint_timeout": "30min",
            "dynamic_shared_memory_type": "mmap",
            "timezone": "UTC",
        }
        if self.ssl_files:
            for src, name in zip(self.ssl_files, ("server.crt", "server.key")):
                with open(src) as f:
                    self._write_server_file(os.path.join(self.datadir, name), f.read())
            conf.update({"ssl": True, "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"})
        conf.update(self.extra_conf)
        lines = ["# written by pooler.devcluster.TempPostgres"]
        lines += [f"{k} = {_conf_value(v)}" for k, v in conf.items()]
        self._write_server_file(os.path.join(self.datadir, "postgresql.auto.conf"),
                                "\n".join(lines) + "\n")
        hba = ["# written by pooler.devcluster.TempPostgres", *self.extra_hba,
               "local all all trust",
               # md5 also accepts SCRAM-stored passwords (with SCRAM), so one line serves both.
               "host all all 127.0.0.1/32 md5"]
        self._write_server_file(os.path.join(self.datadir, "pg_hba.conf"), "\n".join(hba) + "\n")

    def _write_server_file(self, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        if self._run_as:
            st = os.stat(self.datadir)
            os.chown(path, st.st_uid, st.st_gid)

    def _pg_ctl_start(self) -> bool:
        cp = self._run([self._bin("pg_ctl"), "-D", self.datadir, "-l", self.logfile,
                        "-w", "-t", str(int(_READY_TIMEOUT)), "start"],
                       as_server=True, timeout=_READY_TIMEOUT + 10, check=False)
        return cp.returncode == 0

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            cp = self._run([self._bin("psql"), "-X", "-A", "-t", "-h", self.socket_dir,
                            "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                            "-c", "select 1"], check=False, timeout=10)
            if cp.returncode == 0 and cp.stdout.strip() == "1":
                return
            last = cp.stderr
            time.sleep(0.1)
        raise PostgresError(f"PostgreSQL on port {self.port} not ready after {_READY_TIMEOUT}s: "
                            f"{last}\nserver log:\n{self.server_log()[-4000:]}")

    def reload(self) -> None:
        """Re-read postgresql.conf / pg_hba.conf (pg_ctl reload)."""
        self._run([self._bin("pg_ctl"), "-D", self.datadir, "reload"], as_server=True)

    def restart(self, mode: str = "fast", down_for: float = 0.0) -> None:
        """Stop the server (`mode`: fast or immediate, as pg_ctl), stay down `down_for`
        seconds, start it again on the same port with the same data (fault tests)."""
        cp = self._run([self._bin("pg_ctl"), "-D", self.datadir, "-m", mode, "-w", "-t", "30",
                        "stop"], as_server=True, timeout=40, check=False)
        if cp.returncode != 0:
            raise PostgresError(f"pg_ctl stop -m {mode} failed: {cp.stderr}")
        time.sleep(down_for)
        if not self._pg_ctl_start():
            raise PostgresError(f"PostgreSQL did not start again on port {self.port}; "
                                f"server log:\n{self.server_log()[-4000:]}")
        self._wait_ready()

    def stop(self) -> None:
        """Stop the server (fast, then immediate, then SIGKILL) and remove its directory.
        Idempotent; a no-op in a forked child of the process that started it."""
        if os.getpid() != self._owner_pid:
            return
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        if self.datadir and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            pg_ctl = self._bin("pg_ctl")
            for mode, t in (("fast", 30), ("immediate", 15)):
                cp = self._run([pg_ctl, "-D", self.datadir, "-m", mode, "-w", "-t", str(t),
                                "stop"], as_server=True, timeout=t + 10, check=False)
                if cp.returncode == 0 or not self._postmaster_pid():
                    break
            pid = self._postmaster_pid()
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self._running = False
        if self.basedir:
            shutil.rmtree(self.basedir, ignore_errors=True)
            self.basedir = None

    def _postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.datadir, "postmaster.pid")) as f:
                pid = int(f.readline().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, TypeError):
            return None

    @property
    def running(self) -> bool:
        return self._running

    def __enter__(self) -> "TempPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<TempPostgres {state} port={self.port} dir={self.basedir}>"

    # ------------------------------------------------------------------ SQL
    def psql(self, sql: str, db: str = "postgres", user: str = "postgres") -> str:
        """Run `sql` with psql over the Unix socket (trust); unaligned, tuples only.
        Returns stdout stripped; raises PostgresError on any error."""
        if not self._running:
            raise PostgresError("TempPostgres is not running")
        cp = self._run([self._bin("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
                        "-h", self.socket_dir, "-p", str(self.port), "-U", user, "-d", db,
                        "-f", "-"], input=sql, check=False)
        if cp.returncode != 0:
            raise PostgresError(f"psql failed (exit {cp.returncode}) as {user}@{db}: "
                                f"{cp.stderr.strip()}\nSQL: {sql}")
        return cp.stdout.strip()

    def create_role(self, name: str, password: str | None, md5: bool = False,
                    superuser: bool = False, login: bool = True) -> None:
        """Create (or alter, if it exists) a role with `password`, stored as SCRAM,
        or as md5 when md5=True."""
        exists = self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = {_quote_literal(name)}")
        opts = ["LOGIN" if login else "NOLOGIN", "SUPERUSER" if superuser else "NOSUPERUSER"]
        if password is not None:
            opts.append(f"PASSWORD {_quote_literal(password)}")
        verb = "ALTER" if exists == "1" else "CREATE"
        sql = (f"SET password_encryption = '{'md5' if md5 else 'scram-sha-256'}';\n"
               f"{verb} ROLE {_quote_ident(name)} {' '.join(opts)};")
        self.psql(sql)

    def create_database(self, name: str, owner: str = "postgres") -> None:
        self.psql(f"CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(owner)}")

    def password_secret(self, role: str) -> str | None:
        """The stored secret (SCRAM-SHA-256$... or md5...) of `role`, e.g. for a userlist."""
        out = self.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = {_quote_literal(role)}")
        return out or None

    # ---------------------------------------------------------- connect info
    def dsn(self, db: str = "postgres", user: str = "postgres", password: str = "postgres",
            **extra) -> str:
        """libpq keyword/value DSN over TCP to 127.0.0.1."""
        parts = {"host": self.host, "port": self.port, "dbname": db, "user": user}
        if password is not None:
            parts["password"] = password
        parts.update(extra)
        return " ".join(f"{k}={_dsn_value(v)}" for k, v in parts.items())

    def unix_dsn(self, db: str = "postgres", user: str = "postgres", **extra) -> str:
        """libpq DSN over the Unix socket (trust: no password needed)."""
        parts = {"host": self.socket_dir, "port": self.port, "dbname": db, "user": user}
        parts.update(extra)
        return " ".join(f"{k}={_dsn_value(v)}" for k, v in parts.items())

    def uri(self, db: str = "postgres", user: str = "postgres", password: str = "postgres") -> str:
        from urllib.parse import quote
        return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
                f"@{self.host}:{self.port}/{quote(db, safe='')}")


def stop_session(proc: subprocess.Popen, timeout: float = 10.0,
                 sig: int = signal.SIGTERM) -> bool:
    """Signal a process started with start_new_session=True (SIGTERM; pass SIGINT
    for a pooler or PgBouncer, whose SIGTERM waits for clients to leave), wait,
    then SIGKILL its whole session (a pooler's workers, a sidecar's children) so
    nothing outlives the caller. False when it had to be killed."""
    clean = True
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            clean = False
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    return clean

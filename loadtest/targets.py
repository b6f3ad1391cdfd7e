"""What the benchmark talks to: direct PostgreSQL, PgBouncer, and the pooler.

Every target is something pgbench can reach at 127.0.0.1:<port> as user
`bench` / database `bench`. The poolers run with the same settings
(transaction pooling, pool size 20, a large max_client_conn, connection
logging off) and the same userlist, which holds the secrets copied from
PostgreSQL: that is how production userlists usually look, and it spares both
poolers (and our idle-client script, which caches keys per salt) a PBKDF2 per
login, so connection figures measure the poolers, not the hash.

Two roles with the same password: `bench` stored as SCRAM, `bench_md5` as
md5. pgbench uses `bench_md5` by default: libpq's client side of SCRAM costs
~10 ms of pgbench CPU per connection on a small machine (PBKDF2, 4096
rounds), which makes 2000 clients take ~20 s just to log in and caps
`pgbench -C` at ~100 connections/s for every target alike, hiding what churn
is meant to show (the backend fork a pooler saves). SCRAM is still exercised:
by the `churn_scram` scenario, the idle clients (which cache the salted key)
and the locust scenarios. Auth is `md5` in both poolers, which, as in
PostgreSQL's pg_hba, means SCRAM for a user whose secret is SCRAM.

Every process started here is registered and killed at interpreter exit, so
an interrupted run leaves nothing behind.
"""
from __future__ import annotations

import atexit
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from pooler.dev.devcluster import TempPostgres, free_port, stop_session

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_USER = BENCH_DB = BENCH_PASSWORD = "bench"
MD5_USER = "bench_md5"          # same password, stored as md5 (see above)
PGBENCH_USERS = {"md5": MD5_USER, "scram": BENCH_USER}
PGBOUNCER_BIN = os.environ.get("PGBOUNCER", shutil.which("pgbouncer") or "/usr/sbin/pgbouncer")
START_TIMEOUT = 30.0

_live: list[subprocess.Popen] = []


def kill_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGINT the process (for the pooler and PgBouncer alike: exit once servers are
    released), wait, then SIGKILL its whole session (the pooler's workers and
    anything else it forked) so nothing outlives the benchmark."""
    stop_session(proc, timeout, signal.SIGINT)
    if proc in _live:
        _live.remove(proc)


@atexit.register
def _kill_all() -> None:
    for proc in list(_live):
        kill_group(proc, timeout=3)


def spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None,
          user: str | None = None, cwd: str | None = None) -> subprocess.Popen:
    """Start a long-running child in its own session with output to log_path."""
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, user=user, cwd=cwd,
                                group=pwd.getpwnam(user).pw_gid if user else None,
                                extra_groups=[] if user else None)
    finally:
        log.close()
    _live.append(proc)
    return proc


def raise_fd_limit(wanted: int = 1 << 20) -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit (children inherit it):
    2000 pgbench clients or 10k idle connections need that many sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_env() -> dict[str, str]:
    """Environment for pooler / locust children: our repo first on the path,
    and no libpq variables that could redirect a client."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]]
                                                            if os.environ.get("PYTHONPATH") else []))
    return env


def wait_ready(port: int, proc: subprocess.Popen) -> str | None:
    """Both roles can log in and query (this also opens each pool's first server)."""
    return wait_login(port, proc) or wait_login(port, proc, timeout=10, user=MD5_USER)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_login(port: int, proc: subprocess.Popen | None, timeout: float = START_TIMEOUT,
               password: str = BENCH_PASSWORD, user: str = BENCH_USER) -> str | None:
    """Poll until a real login + SELECT 1 works through port; None when it
    does, else why not. A listening socket alone does not prove the pooler
    can reach PostgreSQL."""
    deadline = time.monotonic() + timeout
    last = "timed out"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user=user,
                                    password=password, dbname=BENCH_DB, connect_timeout=3)
            try:
                # Autocommit: a client leaving inside a transaction would make the
                # pooler close that server instead of keeping it warm in the pool.
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
            finally:
                conn.close()
            return None
        except psycopg2.Error as exc:
            last = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            time.sleep(0.2)
    return f"no successful login within {timeout:.0f}s (last error: {last})"


# ---------------------------------------------------------------- PostgreSQL
def make_tls_files(directory: Path) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 and its key (openssl CLI),
    for the `tls` scenario: every target offers TLS with it. (cert, key) paths."""
    cert, key = directory / "tls.crt", directory / "tls.key"
    cp = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                         "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True, timeout=60)
    if cp.returncode != 0:
        raise RuntimeError(f"openssl could not make a certificate:\n{cp.stderr}")
    return str(cert), str(key)


class BenchDatabase:
    """A TempPostgres with role and database `bench` (SCRAM-stored password); with
    `tls` (cert, key) it also offers TLS."""

    def __init__(self, max_connections: int = 300, tls: tuple[str, str] | None = None):
        self.max_connections = max_connections
        self.pg = TempPostgres(extra_conf={"max_connections": max_connections},
                               ssl_cert_file=tls[0] if tls else None,
                               ssl_key_file=tls[1] if tls else None)

    def start(self) -> "BenchDatabase":
        self.pg.start()
        self.pg.create_role(BENCH_USER, BENCH_PASSWORD)
        self.pg.create_role(MD5_USER, BENCH_PASSWORD, md5=True)
        self.pg.create_database(BENCH_DB, owner=BENCH_USER)
        # pgbench -i runs as bench (owner); the md5 role reads and writes its tables.
        self.pg.psql(f"GRANT pg_read_all_data, pg_write_all_data TO {MD5_USER}")
        return self

    def stop(self) -> None:
        self.pg.stop()

    @property
    def port(self) -> int:
        return self.pg.port

    def userlist(self) -> str:
        """A PgBouncer userlist.txt with both roles' secrets as PostgreSQL stores them."""
        scram = self.pg.password_secret(BENCH_USER)
        md5 = self.pg.password_secret(MD5_USER)
        if not scram or not scram.startswith("SCRAM-SHA-256$") or not md5 or not md5.startswith("md5"):
            raise RuntimeError(f"unexpected stored secrets: {scram!r}, {md5!r}")
        return f'"{BENCH_USER}" "{scram}"\n"{MD5_USER}" "{md5}"\n'

    def version(self) -> str:
        return self.pg.psql("SHOW server_version")

    def pgbench_init(self, scale: int, timeout: float = 600) -> None:
        """pgbench -i over the Unix socket (trust), quietly."""
        cmd = ["pgbench", "-i", "-q", "-s", str(scale), "-h", self.pg.socket_dir, "-p", str(self.port),
               "-U", BENCH_USER, BENCH_DB]
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
        if cp.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{cp.stdout}{cp.stderr}")


# ------------------------------------------------------------------- targets
@dataclass
class Target:
    """One thing pgbench can connect to."""
    name: str                 # e.g. "direct", "pgbouncer", "pooler-w1"
    kind: str                 # "direct" | "pgbouncer" | "pooler"
    port: int = 0
    failed: str | None = None  # why it could not start (then it is reported, not run)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    settings: dict = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        """Root of the process tree to measure (None: not ours to measure)."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def alive(self) -> bool:
        return self.kind == "direct" or (self.proc is not None and self.proc.poll() is None)

    def start(self) -> "Target":
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None


class DirectTarget(Target):
    def __init__(self, db: BenchDatabase):
        super().__init__(name="direct", kind="direct", port=db.port)


@dataclass
class PoolSettings:
    pool_size: int = 20
    max_client_conn: int = 20000
    tls: tuple[str, str] | None = None    # (cert, key): offer TLS to clients (sslmode prefer)


class PoolerTarget(Target):
    """The pooler under test: `python -m pooler CONFIG --workers N`."""

    def __init__(self, db: BenchDatabase, workdir: Path, workers: int, settings: PoolSettings,
                 userlist: str, variant: str = "", source: Path | None = None):
        """`variant` "pure": the relay over its pure-Python step (POOLER_PURE_STEP=1);
        "base": the pooler of another checkout, `source` (run with that checkout's
        .venv), so a change and its baseline are measured in the same run."""
        name = f"pooler-w{workers}" + (f"-{variant}" if variant else "")
        super().__init__(name=name, kind="pooler")
        self.db, self.workdir, self.workers = db, workdir, workers
        self.pool, self.userlist = settings, userlist
        self.variant, self.source = variant, source

    def command_env(self) -> tuple[str, dict[str, str], str | None]:
        """(python, environment, working directory) to run this target's pooler with.
        `python -m` puts the working directory first on sys.path, so a baseline runs
        in its own checkout: from this one it would import this checkout's pooler."""
        env = child_env()
        python = sys.executable
        if self.variant == "pure":
            env["POOLER_PURE_STEP"] = "1"
        if self.source is None:
            return python, env, None
        env["PYTHONPATH"] = str(self.source)
        return str(self.source / ".venv" / "bin" / "python"), env, str(self.source)

    def _write_config(self) -> Path:
        import yaml
        userlist = self.workdir / "userlist.txt"
        userlist.write_text(self.userlist)
        cfg = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "pool_mode": "transaction",
            "default_pool_size": self.pool.pool_size,
            "max_client_conn": self.pool.max_client_conn,
            "auth": {"type": "md5", "file": str(userlist)},   # SCRAM for SCRAM secrets
            "databases": {BENCH_DB: {"host": "127.0.0.1", "port": self.db.port}},
            # Logging every login would charge the churn and idle runs for log I/O;
            # PgBouncer gets the same setting.
            "log_connections": False,
            "log_disconnections": False,
        }
        if self.pool.tls:
            cfg.update(client_tls_sslmode="prefer", client_tls_cert_file=self.pool.tls[0],
                       client_tls_key_file=self.pool.tls[1])
        self.settings = cfg
        path = self.workdir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def start(self) -> "PoolerTarget":
        self.port = free_port()
        config = self._write_config()
        self.log_path = self.workdir / f"{self.name}.log"
        python, env, cwd = self.command_env()
        self.proc = spawn([python, "-m", "pooler", str(config), "--workers", str(self.workers)],
                          self.log_path, env=env, cwd=cwd)
        why = wait_ready(self.port, self.proc)
        if why:
            self.failed = f"did not start: {why}; log tail:\n{tail(self.log_path)}"
            self.stop()
        return self


class PgBouncerTarget(Target):
    """PgBouncer with the pooler's settings; as root it runs as `postgres`
    (it refuses to run as root), so its files must be readable by that user."""

    def __init__(self, db: BenchDatabase, workdir: Path, settings: PoolSettings, userlist: str):
        super().__init__(name="pgbouncer", kind="pgbouncer")
        self.db, self.pool, self.userlist = db, settings, userlist
        self.dir = workdir / "pgbouncer"
        self.user = "postgres" if os.geteuid() == 0 else None

    def _write_files(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "userlist.txt").write_text(self.userlist)
        self.log_path = self.dir / "pgbouncer.log"
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "md5",          # SCRAM for SCRAM secrets, like the pooler
            "auth_file": str(self.dir / "userlist.txt"),
            "pool_mode": "transaction",
            "default_pool_size": self.pool.pool_size,
            "max_client_conn": self.pool.max_client_conn,
            "log_connections": 0,
            "log_disconnections": 0,
            "ignore_startup_parameters": "extra_float_digits",
            "logfile": str(self.log_path),
        }
        if self.pool.tls:
            # Copies: PgBouncer runs as `postgres` and must be able to read them.
            for src, name in zip(self.pool.tls, ("tls.crt", "tls.key")):
                shutil.copyfile(src, self.dir / name)
            settings.update(client_tls_sslmode="prefer", client_tls_cert_file=str(self.dir / "tls.crt"),
                            client_tls_key_file=str(self.dir / "tls.key"))
        self.settings = settings
        ini = [
            "[databases]",
            f"{BENCH_DB} = host=127.0.0.1 port={self.db.port} dbname={BENCH_DB}",
            "[pgbouncer]",
            *(f"{k} = {v}" for k, v in settings.items()),
        ]
        path = self.dir / "pgbouncer.ini"
        path.write_text("\n".join(ini) + "\n")
        if self.user:
            pw = pwd.getpwnam(self.user)
            for p in [self.dir, *self.dir.iterdir()]:
                os.chown(p, pw.pw_uid, pw.pw_gid)
        return path

    def start(self) -> "PgBouncerTarget":
        self.port = free_port()
        ini = self._write_files()
        console = self.dir / "console.log"
        self.proc = spawn([PGBOUNCER_BIN, str(ini)], console, env=child_env(), user=self.user)
        why = wait_ready(self.port, self.proc)
        if why:
            self.failed = f"did not start: {why}; log tail:\n{tail(self.log_path)}\n{tail(console)}"
            self.stop()
        return self


def pgbouncer_version() -> str:
    try:
        out = subprocess.run([PGBOUNCER_BIN, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        return out.splitlines()[0].strip() if out else "unknown"
    except OSError:
        return "not installed"


def make_workdir() -> Path:
    """A temp dir that the `postgres` OS user can traverse (for PgBouncer)."""
    d = Path(tempfile.mkdtemp(prefix="pooler-bench-"))
    os.chmod(d, 0o755)
    return d

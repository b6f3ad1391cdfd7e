"""`pooler demo`: a throwaway PostgreSQL, the pooler in front of it, and pgbench through it.

    pooler demo [--seconds N] [--clients N] [--keep] [--workdir DIR]

Starts a TempPostgres with a database `demo` and a role `demo`/`demo`, writes a
pooler config and userlist into the work dir (default: ./demo-run in the
repository, else a temp dir), runs the pooler (transaction mode, pool size 5)
on 127.0.0.1:6432 (or a free port if 6432 is taken), and the admin sidecar if
there is one, then `pgbench -i -s 1` and `pgbench -S -c N -T N` through the
pooler. Prints the pgbench summary, the connection URI and the log paths. With
--keep it leaves everything running until Ctrl-C. The work dir (config, logs)
is kept; the PostgreSQL cluster and the processes are not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pooler.dev.devcluster import PostgresError, TempPostgres, find_pg_bindir, free_port, stop_session

DEMO_DB = DEMO_USER = DEMO_PASSWORD = "demo"
PREFERRED_PORT = 6432
SIDECAR_PREFERRED_PORT = 8080
START_TIMEOUT = 30.0
REPO_ROOT = Path(__file__).resolve().parents[2]    # pooler/dev/demo.py -> the checkout


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int) -> int:
    return preferred if _port_free(preferred) else free_port()


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def _default_workdir() -> Path:
    if (REPO_ROOT / "pyproject.toml").exists() and os.access(REPO_ROOT, os.W_OK):
        return REPO_ROOT / "demo-run"
    return Path(tempfile.mkdtemp(prefix="pooler-demo-"))


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _stop_proc(proc: subprocess.Popen | None, name: str, timeout: float = 10.0,
               sig: signal.Signals = signal.SIGTERM) -> None:
    if proc is None:
        return
    if not stop_session(proc, timeout, sig):
        _say(f"{name} did not stop within {timeout:.0f}s of {sig.name}; killed it")


def _run_pgbench(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run pgbench, echoing its output indented as it comes; return (rc, output)."""
    _say("$ " + " ".join(args))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, text=True, bufsize=1)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            _say("    " + line.rstrip("\n"))
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return rc, "".join(out)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pooler demo",
                                 description="Run PostgreSQL + the pooler + pgbench, locally.")
    ap.add_argument("--seconds", type=int, default=10, help="pgbench duration (default 10)")
    ap.add_argument("--clients", type=int, default=16, help="pgbench clients (default 16)")
    ap.add_argument("--keep", action="store_true",
                    help="leave PostgreSQL and the pooler running until Ctrl-C")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where config and logs go (default: ./demo-run in the repo)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)

    # SIGTERM behaves like Ctrl-C: clean up, then exit.
    def _on_term(signum, frame):
        raise KeyboardInterrupt
    prev_term = signal.signal(signal.SIGTERM, _on_term)

    pg: TempPostgres | None = None
    pooler: subprocess.Popen | None = None
    sidecar: subprocess.Popen | None = None
    rc = 1
    try:
        workdir = (args.workdir or _default_workdir()).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        pooler_log = workdir / "pooler.log"
        sidecar_log = workdir / "sidecar.log"
        config_path = workdir / "pooler.yaml"
        userlist_path = workdir / "userlist.txt"
        bindir = find_pg_bindir()
        pgbench = os.path.join(bindir, "pgbench")
        if not os.path.isfile(pgbench):
            pgbench = shutil.which("pgbench") or "pgbench"

        _say("== starting a throwaway PostgreSQL")
        pg = TempPostgres(bindir=bindir).start()
        pg.create_role(DEMO_USER, DEMO_PASSWORD)
        pg.create_database(DEMO_DB, owner=DEMO_USER)
        _say(f"   PostgreSQL {pg.psql('SHOW server_version')} on 127.0.0.1:{pg.port} "
             f"(data in {pg.datadir}, log {pg.logfile})")

        port = _pick_port(PREFERRED_PORT)
        userlist_path.write_text(f'"{DEMO_USER}" "{DEMO_PASSWORD}"\n')
        config = {
            "listen_addr": "127.0.0.1",
            "listen_port": port,
            "pool_mode": "transaction",
            "default_pool_size": 5,
            "max_client_conn": max(100, args.clients * 2),
            "admin_users": [DEMO_USER],
            "stats_users": [DEMO_USER],
            "auth": {"type": "scram-sha-256", "file": str(userlist_path)},
            "databases": {DEMO_DB: {"host": "127.0.0.1", "port": pg.port, "dbname": DEMO_DB}},
        }
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))

        _say(f"== starting the pooler on 127.0.0.1:{port} (config {config_path})")
        with open(pooler_log, "wb") as logf:
            pooler = subprocess.Popen([sys.executable, "-m", "pooler", str(config_path)],
                                      stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=workdir, env=_child_env(),
                                      start_new_session=True)
        if not _wait_port(port, pooler, START_TIMEOUT):
            state = (f"exited with code {pooler.returncode}" if pooler.poll() is not None
                     else f"not listening after {START_TIMEOUT:.0f}s")
            _say(f"!! the pooler {state}; last lines of {pooler_log}:\n{_tail(pooler_log)}")
            return 1

        sidecar_port = None
        if (REPO_ROOT / "sidecar" / "app.py").exists():
            sidecar_port = _pick_port(SIDECAR_PREFERRED_PORT)
            with open(sidecar_log, "wb") as logf:
                sidecar = subprocess.Popen(
                    [sys.executable, "-m", "sidecar.app", "--config", str(config_path),
                     "--host", "127.0.0.1", "--port", str(sidecar_port)],
                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=workdir, env=_child_env(), start_new_session=True)
            if not _wait_port(sidecar_port, sidecar, 10):
                _say(f"   (the admin sidecar did not come up; see {sidecar_log}; going on without it)")
                _stop_proc(sidecar, "sidecar")
                sidecar, sidecar_port = None, None
            else:
                _say(f"== admin sidecar on http://127.0.0.1:{sidecar_port}/ (log {sidecar_log})")

        env = dict(os.environ)
        for k in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGOPTIONS"):
            env.pop(k, None)
        env["PGPASSWORD"] = DEMO_PASSWORD
        conn_args = ["-h", "127.0.0.1", "-p", str(port), "-U", DEMO_USER]

        _say("== pgbench -i (initialise, through the pooler)")
        irc, _ = _run_pgbench([pgbench, "-i", "-s", "1", "-q", *conn_args, DEMO_DB], env)
        if irc != 0:
            _say(f"!! pgbench -i failed (exit {irc}); last lines of {pooler_log}:\n"
                 f"{_tail(pooler_log)}")
            return 1

        _say(f"== pgbench -S: {args.clients} clients for {args.seconds}s through the pooler "
             f"(transaction pooling, pool size 5)")
        progress = ["-P", str(max(1, args.seconds // 5))] if args.seconds >= 2 else []
        brc, _ = _run_pgbench([pgbench, "-S", "-c", str(args.clients), "-j",
                               str(min(args.clients, os.cpu_count() or 1)),
                               "-T", str(args.seconds), *progress, *conn_args, DEMO_DB], env)
        rc = 0 if brc == 0 else 1

        uri = f"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{port}/{DEMO_DB}"
        admin_uri = f"postgresql://{DEMO_USER}:{DEMO_PASSWORD}@127.0.0.1:{port}/pgbouncer"
        _say()
        _say("== " + ("pgbench succeeded" if rc == 0 else f"!! pgbench failed (exit {brc})"))
        _say(f"   connection URI : {uri}")
        _say(f"   pooler log     : {pooler_log}")
        _say(f"   pooler config  : {config_path}")
        if args.keep:
            _say(f"   PostgreSQL     : 127.0.0.1:{pg.port} (log {pg.logfile})")
        else:
            _say(f"   PostgreSQL     : 127.0.0.1:{pg.port} (throwaway: removed at exit)")
        _say(f"   admin console  : psql '{admin_uri}' -c 'SHOW POOLS'   (also SHOW STATS, CLIENTS, SERVERS)")
        if sidecar_port:
            _say(f"   admin sidecar  : http://127.0.0.1:{sidecar_port}/ (log {sidecar_log})")
            _say("                    /healthz /readyz /metrics /pools")
        if rc != 0:
            _say(f"   last lines of the pooler log:\n{_tail(pooler_log)}")
        if args.keep:
            _say()
            _say("   Try:")
            _say(f"     psql '{uri}'")
            _say(f"     psql '{admin_uri}' -c 'SHOW POOLS'")
            _say(f"     pgbench -S -c 50 -T 10 '{uri}'")
            _say("   Everything keeps running until you press Ctrl-C.")
            while pooler.poll() is None:
                time.sleep(0.5)
            _say(f"!! the pooler exited (code {pooler.returncode}); see {pooler_log}")
            rc = 1
        else:
            _say(f"   Try it live: pooler demo --keep, then: psql '{uri}'")
        return rc
    except KeyboardInterrupt:
        _say("\n== interrupted")
        return rc if (args.keep and rc == 0) else 130
    except (PostgresError, OSError) as e:
        _say(f"!! {e}")
        return 1
    finally:
        _say("== cleaning up")
        # Ignore further Ctrl-C while cleaning, so the cluster is not left behind.
        prev_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _stop_proc(sidecar, "sidecar")
            _stop_proc(pooler, "pooler", sig=signal.SIGINT)   # its SIGTERM waits for clients
            if pg is not None:
                pg.stop()
        finally:
            signal.signal(signal.SIGINT, prev_int)
            signal.signal(signal.SIGTERM, prev_term)


if __name__ == "__main__":
    sys.exit(main())

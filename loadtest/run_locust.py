"""Run the locust scenarios headless and check the money invariant.

    python -m loadtest.run_locust [--dsn DSN --direct-dsn DSN] [--users 50] [--spawn-rate 10]
                                  [--seconds 30] [--out DIR] [--tags read write ...]

Without --dsn it starts its own throwaway PostgreSQL and a pooler in front of
it (transaction pooling, pool size 10). With --dsn it tests your pooler;
--direct-dsn (straight to PostgreSQL, used to seed the table and check the
invariant) defaults to --dsn. The table `accounts` is dropped and re-seeded.

Exit status: 0 only if locust saw no failure and sum(balance) is unchanged.
Reports (CSV, HTML, JSON, locust log) go to loadtest/reports/locust-<timestamp>/ or --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import signal
import subprocess
import sys
from pathlib import Path

from . import accounts
from .targets import (BenchDatabase, PoolerTarget, PoolSettings, child_env, make_workdir,
                      raise_fd_limit, tail)

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.run_locust",
                                 description="locust scenarios through a pooler + money invariant.")
    ap.add_argument("--dsn", help="the pooler to test (default: start PostgreSQL + pooler here)")
    ap.add_argument("--direct-dsn", help="PostgreSQL itself, for seeding and the final check (default: --dsn)")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--spawn-rate", type=float, default=10)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--accounts", type=int, default=1000, help="rows in accounts (default 1000)")
    ap.add_argument("--pool-size", type=int, default=10, help="pool size of the pooler started here")
    ap.add_argument("--tags", nargs="+", help="only these scenario tags (read write long churn slow invariant)")
    ap.add_argument("--out", type=Path, help="report directory")
    return ap.parse_args(argv)


def locust_command(args: argparse.Namespace, outdir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.seconds}s",
           "--stop-timeout", "5",           # let users finish their transaction, bounded
           "--csv", str(outdir / "locust"), "--html", str(outdir / "locust.html"),
           "--json-file", str(outdir / "locust"),  # locust appends .json
           "--only-summary", "--logfile", str(outdir / "locust.log")]
    if args.tags:
        cmd += ["--tags", *args.tags]
    return cmd


def run_locust(args: argparse.Namespace, dsn: str, outdir: Path) -> int:
    env = child_env()
    env.update({"POOLER_DSN": dsn, "LOADTEST_ACCOUNTS": str(args.accounts)})
    cmd = locust_command(args, outdir)
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        # Bounded: spawn time + run time + stop timeout + slack.
        return proc.wait(timeout=args.seconds + args.users / max(args.spawn_rate, 0.1) + 90)
    except subprocess.TimeoutExpired:
        log("locust did not finish in time: killed")
        return -1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def read_stats(outdir: Path) -> tuple[list[dict], dict | None]:
    """Rows of locust_stats.csv and its Aggregated row."""
    path = outdir / "locust_stats.csv"
    if not path.exists():
        return [], None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    agg = next((r for r in rows if r.get("Name") == "Aggregated"), None)
    return [r for r in rows if r.get("Name") != "Aggregated"], agg


def print_stats(rows: list[dict], agg: dict | None) -> int:
    """A short table; returns the total failure count (-1: no stats at all)."""
    if agg is None:
        log("no locust statistics were written")
        return -1
    log(f"{'name':46} {'requests':>9} {'failures':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows + [agg]:
        log(f"{r['Name'][:46]:46} {r['Request Count']:>9} {r['Failure Count']:>9} "
            f"{r.get('50%', ''):>8} {r.get('99%', ''):>8}")
    return int(agg["Failure Count"])


def print_failures(outdir: Path) -> None:
    path = outdir / "locust_failures.csv"
    if not path.exists():
        return
    with open(path, newline="") as f:
        for r in list(csv.DictReader(f))[:10]:
            log(f"  failure x{r.get('Occurrences')}: {r.get('Name')}: {r.get('Error', '')[:300]}")


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt    # same cleanup path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored; we want
    # Ctrl-C / kill -INT to clean up like SIGTERM does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_fd_limit()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = args.out or HERE / "reports" / f"locust-{stamp}"
    outdir.mkdir(parents=True, exist_ok=True)
    db = pooler = workdir = None
    try:
        if args.dsn:
            dsn, direct = args.dsn, args.direct_dsn or args.dsn
        else:
            log("starting a throwaway PostgreSQL and the pooler (transaction pooling, "
                f"pool size {args.pool_size})")
            db = BenchDatabase().start()
            workdir = make_workdir()
            pooler = PoolerTarget(db, workdir, 1, PoolSettings(pool_size=args.pool_size),
                                  db.userlist()).start()
            if pooler.failed:
                log(f"the pooler did not start: {pooler.failed}")
                return 1
            dsn = f"host=127.0.0.1 port={pooler.port} dbname=bench user=bench password=bench"
            direct = db.pg.dsn("bench", "bench", "bench")
        log(f"seeding {args.accounts} accounts × {accounts.INITIAL_BALANCE} via {direct.split(' password=')[0]}")
        accounts.seed(direct, args.accounts)
        rc = run_locust(args, dsn, outdir)
        rows, agg = read_stats(outdir)
        failures = print_stats(rows, agg)
        print_failures(outdir)
        holds, text = accounts.check(direct, args.accounts)
        log(f"invariant {'holds' if holds else 'BROKEN'}: {text}")
        if pooler is not None and not pooler.alive():
            log(f"the pooler died during the run; log tail:\n{tail(pooler.log_path)}")
            holds = False
        log(f"reports: {outdir}/locust.html, locust_stats.csv, locust.json, locust.log")
        ok = rc == 0 and failures == 0 and holds
        if rc not in (0, 1):
            log(f"locust exited with code {rc}; see {outdir}/locust.log")
        log("PASS" if ok else "FAIL")
        return 0 if ok else 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if pooler is not None:
            pooler.stop()
            _keep_log(pooler.log_path, outdir)
        if db is not None:
            db.stop()
        if workdir is not None:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)


def _keep_log(path: Path | None, outdir: Path) -> None:
    if path and path.exists():
        (outdir / "pooler.log").write_bytes(path.read_bytes())


if __name__ == "__main__":
    raise SystemExit(main())

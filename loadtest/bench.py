"""Benchmark the pooler against PgBouncer and direct PostgreSQL with pgbench.

    python -m loadtest.bench [--quick] [--scenarios select,prepared,...] [--reps N]
                             [--seconds S] [--workers 1,2] [--pure-step]
                             [--baseline CHECKOUT] [--out DIR]

Starts a throwaway PostgreSQL, loads it with `pgbench -i`, starts the pooler
(once per --workers value) and PgBouncer with the same pool settings, runs
each scenario against every target in turn, and writes report.md,
report.json and tps.png to loadtest/reports/<timestamp>/ (or --out). The
markdown is printed to stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import signal
import sys
import time
from pathlib import Path

from . import report
from .pgbench import PgbenchSpec
from .scenarios import Point, measure_idle, run_point, write_select1
from .targets import (BENCH_USER, MD5_USER, PGBENCH_USERS, BenchDatabase, DirectTarget,
                      PgBouncerTarget, PoolerTarget, PoolSettings, Target, make_tls_files,
                      make_workdir, pgbouncer_version, raise_fd_limit)

ALL_SCENARIOS = ("select", "extended", "prepared", "tpcb", "churn", "churn_scram", "latency", "idle", "cpu",
                 "tls")
QUICK_SCENARIOS = ("select", "prepared", "churn", "idle")
SELECT_CLIENTS = (16, 64, 512, 2000)
REPORTS_DIR = Path(__file__).resolve().parent / "reports"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench",
                                 description="pgbench: the pooler vs PgBouncer vs direct PostgreSQL.")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: select@16, prepared@64, churn, 200 idle; 2 s runs, 1 rep (<60 s)")
    ap.add_argument("--scenarios", nargs="+", default=None, metavar="NAME",
                    help=f"any of {', '.join(ALL_SCENARIOS)} (space or comma separated; default all)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per point (default 3; quick 1)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per pgbench run (default 10; quick 2)")
    ap.add_argument("--workers", default="1", help="pooler worker counts to run, e.g. 1,2 (default 1)")
    ap.add_argument("--clients", default=None,
                    help=f"client counts of the select scenario (default {','.join(map(str, SELECT_CLIENTS))}; quick 16)")
    ap.add_argument("--idle-clients", type=int, default=None, help="idle connections (default 10000; quick 200)")
    ap.add_argument("--scale", type=int, default=None, help="pgbench -i scale (default 10; quick 1)")
    ap.add_argument("--pool-size", type=int, default=20)
    ap.add_argument("--pgbench-auth", choices=sorted(PGBENCH_USERS), default="md5",
                    help="how pgbench logs in (default md5: libpq's SCRAM costs ~10 ms of pgbench CPU "
                         "per connection; see loadtest/targets.py)")
    ap.add_argument("--max-connections", type=int, default=300, help="PostgreSQL max_connections")
    ap.add_argument("--pure-step", action="store_true",
                    help="also run the pooler over the relay's pure-Python step (target pooler-wN-pure)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT",
                    help="also run the pooler of another checkout with its own .venv (target "
                         "pooler-wN-base), e.g. a worktree of main: before/after in one run")
    ap.add_argument("--out", type=Path, default=None, help="report directory (default loadtest/reports/<timestamp>)")
    args = ap.parse_args(argv)
    _apply_defaults(args, ap)
    return args


def _apply_defaults(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    q = args.quick
    names = [s for item in (args.scenarios or []) for s in item.split(",") if s]
    args.scenarios = names or list(QUICK_SCENARIOS if q else ALL_SCENARIOS)
    unknown = [s for s in args.scenarios if s not in ALL_SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {', '.join(ALL_SCENARIOS)}")
    args.reps = args.reps or (1 if q else 3)
    args.seconds = args.seconds or (2.0 if q else 10.0)
    args.clients = _csv_ints(args.clients) if args.clients else ([16] if q else list(SELECT_CLIENTS))
    args.idle_clients = args.idle_clients or (200 if q else 10000)
    args.scale = args.scale or (1 if q else 10)
    args.workers = _csv_ints(args.workers) or [1]


# Seconds of pgbench time per connection per thread, to extend -T with (measured
# on a 2-CPU machine: 2000 md5 logins take ~0.6 s over 2 threads, SCRAM ~22 s).
CONNECT_COST = {"md5": 0.002, "scram": 0.025}


def build_points(args: argparse.Namespace, select1: str) -> list[Point]:
    """The pgbench points of the chosen scenarios, in run order."""
    sc, secs = args.scenarios, args.seconds
    user = PGBENCH_USERS[args.pgbench_auth]

    def spec(clients: int, **kw) -> PgbenchSpec:
        kw.setdefault("user", user)
        threads = min(2, clients)
        allowance = clients / threads * CONNECT_COST["md5" if kw["user"] == MD5_USER else "scram"]
        return PgbenchSpec(clients=clients, seconds=secs, connect_allowance=allowance, **kw)

    points: list[Point] = []
    select_clients = list(args.clients) if "select" in sc else []
    if "cpu" in sc and 64 not in select_clients:
        select_clients.append(64)      # CPU per transaction is measured during select@64
    for c in sorted(select_clients):
        points.append(Point("select", spec(c)))
    for mode in ("extended", "prepared"):
        if mode in sc:
            points.append(Point(mode, spec(64, mode=mode)))
    if "tpcb" in sc:
        points.append(Point("tpcb", spec(16, select_only=False)))
    if "churn" in sc:       # always md5: see targets.py on why not SCRAM
        points.append(Point("churn", spec(16, connect_per_tx=True, user=MD5_USER)))
    if "churn_scram" in sc:
        points.append(Point("churn_scram", spec(16, connect_per_tx=True, user=BENCH_USER)))
    if "latency" in sc:
        points.append(Point("latency", spec(1, script=select1, log_latency=True, threads=1)))
    if "tls" in sc:        # pgbench -S over TLS to every target (client side; servers plain)
        points.append(Point("tls", spec(64, sslmode="require")))
    return points


def make_targets(db: BenchDatabase, workdir: Path, args: argparse.Namespace, userlist: str) -> list[Target]:
    """direct, PgBouncer, then one pooler per worker count: the A/B/C order of every repetition."""
    pool = PoolSettings(pool_size=args.pool_size, tls=args.tls_files)
    targets: list[Target] = [DirectTarget(db), PgBouncerTarget(db, workdir, pool, userlist)]
    targets += [PoolerTarget(db, workdir, w, pool, userlist) for w in args.workers]
    if args.pure_step:
        targets += [PoolerTarget(db, workdir, w, pool, userlist, "pure") for w in args.workers]
    if args.baseline:
        targets += [PoolerTarget(db, workdir, w, pool, userlist, "base", args.baseline.resolve())
                    for w in args.workers]
    return targets


def fresh_copy(t: Target, db: BenchDatabase, workdir: Path, args: argparse.Namespace, userlist: str) -> Target:
    """A new, not yet started instance of the same target (idle memory is measured from a clean start)."""
    pool = PoolSettings(pool_size=args.pool_size, tls=args.tls_files)
    if isinstance(t, PoolerTarget):
        return PoolerTarget(db, workdir, t.workers, pool, userlist, t.variant, t.source)
    return PgBouncerTarget(db, workdir, pool, userlist)


def direct_na(db: BenchDatabase, n_poolers: int, pool_size: int):
    """Direct PostgreSQL cannot take more clients than its free connection slots."""
    def na(t: Target, point: Point) -> str | None:
        if t.kind != "direct":
            return None
        free = db.max_connections - 3 - n_poolers * pool_size   # 3: superuser_reserved_connections
        if point.clients > free:
            return f"{point.clients} clients > PostgreSQL max_connections {db.max_connections}"
        return None
    return na


def run_idle(args, db, workdir, userlist, targets: list[Target]) -> dict:
    """Idle memory on freshly started poolers (one at a time, nothing else running)."""
    out: dict = {}
    for t in targets:
        if t.kind == "direct":
            continue
        fresh = fresh_copy(t, db, workdir, args, userlist).start()
        try:
            out[t.name] = measure_idle(fresh, args.idle_clients, log)
        finally:
            fresh.stop()
    return out


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt    # same cleanup path as Ctrl-C


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Started in the background by a non-interactive shell, SIGINT arrives ignored; we want
    # Ctrl-C / kill -INT to clean up like SIGTERM does.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fd_limit = raise_fd_limit()
    started = dt.datetime.now(dt.timezone.utc)
    outdir = args.out or REPORTS_DIR / started.strftime("%Y%m%d-%H%M%S")
    if fd_limit < max([args.idle_clients, *args.clients]) + 100:   # per process: client side or pooler
        log(f"warning: open-file limit {fd_limit} is low for {max([args.idle_clients, *args.clients])} clients")
    workdir = make_workdir()
    args.tls_files = make_tls_files(workdir) if "tls" in args.scenarios else None
    db = BenchDatabase(max_connections=args.max_connections, tls=args.tls_files)
    targets: list[Target] = []
    data: dict = {"date": started.isoformat(timespec="seconds"), "machine": report.machine_info(),
                  "settings": {**{k: str(v) if isinstance(v, Path) else v
                                  for k, v in vars(args).items() if k not in ("out", "tls_files")},
                               "max_client_conn": PoolSettings().max_client_conn, "fd_limit": fd_limit},
                  "targets": {}, "points": [], "idle": {}, "incidents": []}
    rc = 0
    t0 = time.monotonic()
    try:
        log(f"starting PostgreSQL (max_connections {args.max_connections}) and pgbench -i -s {args.scale}")
        db.start()
        db.pgbench_init(args.scale)
        userlist = db.userlist()
        data["versions"] = {"postgresql": db.version(), "pgbouncer": pgbouncer_version()}
        targets = make_targets(db, workdir, args, userlist)
        for t in targets:
            t.start()
            log(f"target {t.name}: " + (f"port {t.port}" if not t.failed else f"FAILED {t.failed}"))
        data["targets"] = {t.name: {"kind": t.kind, "port": t.port, "failed": t.failed,
                                    "settings": t.settings} for t in targets}
        points = build_points(args, write_select1(workdir))
        na = direct_na(db, len(targets) - 1, args.pool_size)
        try:
            for point in points:
                log(f"{point.scenario}: {point.clients} clients, {args.reps} rep(s) × {args.seconds:g} s")
                run_point(point, targets, args.reps, log, data["incidents"], na)
                data["points"].append(point.as_dict())
            for t in targets:            # free CPU and memory before the idle measurement
                t.stop()
            if "idle" in args.scenarios:
                log(f"idle: {args.idle_clients} idle clients per pooler")
                data["idle"] = run_idle(args, db, workdir, userlist, targets)
        except KeyboardInterrupt:
            log("interrupted: writing a partial report")
            data["interrupted"] = True
            rc = 130
        data["elapsed_seconds"] = round(time.monotonic() - t0, 1)
        md, _ = report.write(data, outdir)
        print(md, flush=True)
        log(f"report: {outdir}/report.md (also report.json, tps.png); {data['elapsed_seconds']} s")
        return rc
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for t in targets:
            t.stop()
        db.stop()
        _keep_logs(workdir, outdir)
        shutil.rmtree(workdir, ignore_errors=True)


def _keep_logs(workdir: Path, outdir: Path) -> None:
    """Copy the poolers' logs next to the report: a failure there is only useful with them."""
    if not outdir.is_dir():
        return
    for log_file in list(workdir.glob("*.log")) + list(workdir.glob("pgbouncer/*.log")):
        dest = outdir / "logs"
        dest.mkdir(exist_ok=True)
        shutil.copy(log_file, dest / log_file.name)


if __name__ == "__main__":
    raise SystemExit(main())

"""Run pgbench against a target and turn its output into numbers.

A failed run is data, not an exception: PgBouncer 1.18 cannot run
`-M prepared` in transaction mode, and a pooler under test may refuse
connections at 2000 clients; both must show up in the report.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field

from . import procstats
from .targets import BENCH_DB, BENCH_PASSWORD, BENCH_USER, Target, child_env


@dataclass
class PgbenchSpec:
    """One pgbench invocation, independent of the target."""
    clients: int
    seconds: float
    select_only: bool = True          # -S; False: built-in TPC-B-like
    mode: str = "simple"              # -M simple|extended|prepared
    connect_per_tx: bool = False      # -C
    script: str | None = None         # -f FILE instead of a built-in
    log_latency: bool = False         # -l, for percentiles
    threads: int | None = None        # -j; default min(2, clients): the machine is small
    user: str = BENCH_USER
    connect_allowance: float = 0.0    # extra -T seconds for logging in all clients (see duration)
    sslmode: str = "disable"          # PGSSLMODE: libpq's default `prefer` would pick TLS
                                      # wherever the target offers it

    def duration(self) -> int:
        """-T: pgbench's clock includes logging in every client first (one
        login each, sequential per thread), so many clients get extra
        seconds to keep `seconds` of actual benchmark; tps excludes that time."""
        return max(1, round(self.seconds + self.connect_allowance))

    def args(self, port: int, log_prefix: str | None) -> list[str]:
        threads = self.threads or min(2, self.clients)
        cmd = ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", self.user,
               "-c", str(self.clients), "-j", str(threads), "-T", str(self.duration()),
               "-M", self.mode]
        if self.script:
            cmd += ["-f", self.script]
        elif self.select_only:
            cmd.append("-S")
        if self.connect_per_tx:
            cmd.append("-C")
        if self.log_latency and log_prefix:
            cmd += ["-l", f"--log-prefix={log_prefix}"]
        return cmd + [BENCH_DB]


@dataclass
class PgbenchResult:
    target: str
    ok: bool
    rc: int | None
    tps: float | None = None
    transactions: int = 0
    failed_transactions: int = 0
    aborted_clients: int = 0
    connection_errors: int = 0
    latency_avg_ms: float | None = None
    initial_connection_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_seconds: float | None = None      # the target's processes, during the run
    cpu_us_per_tx: float | None = None
    wall_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)   # first distinct error lines

    def as_dict(self) -> dict:
        return asdict(self)


_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def _search(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def parse_output(target: str, rc: int | None, out: str, err: str) -> PgbenchResult:
    """Fill a result from pgbench's stdout summary and stderr errors."""
    res = PgbenchResult(target=target, ok=False, rc=rc)
    # "(without initial connection time)", or with -C "(including reconnection times)".
    tps = _search(rf"tps = {_NUM} \((?:without initial connection|including reconnection)", out)
    res.tps = float(tps) if tps else None
    res.transactions = int(_search(r"number of transactions actually processed: (\d+)", out) or 0)
    res.failed_transactions = int(_search(r"number of failed transactions: (\d+)", out) or 0)
    lat = _search(rf"latency average = {_NUM} ms", out)
    res.latency_avg_ms = float(lat) if lat else None
    conn = _search(rf"initial connection time = {_NUM} ms", out)
    res.initial_connection_ms = float(conn) if conn else None
    error_lines = [l.strip() for l in err.splitlines() if "error" in l.lower() or "fatal" in l.lower()]
    res.aborted_clients = sum(1 for l in error_lines if re.search(r"client \d+ .*aborted", l))
    res.connection_errors = sum(1 for l in error_lines
                                if "connection to server" in l or "could not connect" in l
                                or "could not create connection" in l)
    seen: list[str] = []
    for line in error_lines:
        # "client 7 script 0 aborted ..." repeats per client, and two threads may
        # interleave their "pgbench: error:" prefixes: keep one line of each kind.
        key = re.sub(r"client \d+", "client N", line)
        key = re.sub(r"^(?:\s*(?:pgbench:|error:))+\s*", "", key)
        if key not in seen:
            seen.append(key)
    if res.tps is None and not seen:
        last = out.strip().splitlines()[-1:] or ["(no output)"]
        seen.append(f"no tps line in pgbench output (rc={rc}); last line: {last[0]}")
    res.errors = seen[:5]
    res.ok = (rc == 0 and res.tps is not None and res.aborted_clients == 0
              and res.connection_errors == 0 and res.failed_transactions == 0)
    return res


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    idx = min(len(sorted_vals) - 1, max(0, int(round(q / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[idx]


def read_latency_logs(prefix: str) -> list[float]:
    """Per-transaction latencies (ms) from pgbench -l files: field 3 is µs."""
    values: list[float] = []
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    values.append(int(parts[2]) / 1000.0)
    return sorted(values)


def run(target: Target, spec: PgbenchSpec, timeout_slack: float = 120.0) -> PgbenchResult:
    """Run pgbench against target; bounded by seconds + slack (a hang is a failure)."""
    logdir = tempfile.mkdtemp(prefix="pgbench-log-")
    prefix = os.path.join(logdir, "pgbench_log")
    cmd = spec.args(target.port, prefix)
    env = child_env()
    env["PGPASSWORD"] = BENCH_PASSWORD
    env["PGSSLMODE"] = spec.sslmode
    pid = target.pid
    cpu0 = procstats.cpu_seconds(pid) if pid else None
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=logdir, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=spec.duration() + timeout_slack)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rc = None
        err += f"\nerror: pgbench did not finish within {spec.duration() + timeout_slack:.0f}s (killed)"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    wall = time.monotonic() - t0
    res = parse_output(target.name, rc, out, err)
    res.wall_seconds = round(wall, 2)
    if cpu0 is not None and target.pid:
        res.cpu_seconds = round(procstats.cpu_seconds(target.pid) - cpu0, 3)
        if res.transactions:
            res.cpu_us_per_tx = round(res.cpu_seconds / res.transactions * 1e6, 2)
    if spec.log_latency:
        lats = read_latency_logs(prefix)
        if lats:
            res.p50_ms = round(_percentile(lats, 50), 4)
            res.p99_ms = round(_percentile(lats, 99), 4)
    for path in glob.glob(prefix + ".*"):
        os.unlink(path)
    os.rmdir(logdir)
    return res

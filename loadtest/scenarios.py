"""The benchmark's scenarios: what runs, in which order, against which target.

pgbench scenarios are "points" (one pgbench spec). Each repetition runs the
point once against every target in a fixed order (A/B/C/A/B/C...), so slow
drift on a noisy machine hits all targets alike and the per-repetition ratio
pooler/PgBouncer compares runs taken seconds apart.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import procstats
from .pgbench import PgbenchResult, PgbenchSpec, run as run_pgbench
from .targets import Target, child_env, tail, wait_login

Log = Callable[[str], None]


@dataclass
class Point:
    """One pgbench configuration of a scenario, run against every target."""
    scenario: str
    spec: PgbenchSpec
    runs: dict[str, list[dict]] = field(default_factory=dict)     # target -> one result per rep
    not_applicable: dict[str, str] = field(default_factory=dict)  # target -> why it was not run

    @property
    def clients(self) -> int:
        return self.spec.clients

    def as_dict(self) -> dict:
        s = self.spec
        return {"scenario": self.scenario, "clients": s.clients, "seconds": s.seconds, "mode": s.mode,
                "select_only": s.select_only, "connect_per_tx": s.connect_per_tx,
                "runs": self.runs, "not_applicable": self.not_applicable}


def _describe(res: PgbenchResult) -> str:
    if res.ok:
        extra = f", p50 {res.p50_ms} ms p99 {res.p99_ms} ms" if res.p50_ms is not None else ""
        cpu = f", {res.cpu_us_per_tx} µs CPU/tx" if res.cpu_us_per_tx is not None else ""
        return f"tps {res.tps:.0f}{extra}{cpu}"
    return f"FAILED rc={res.rc} tps={res.tps} errors={res.errors[:2]}"


def check_alive(target: Target, log: Log) -> str | None:
    """After a run: if a pooler process died, say so (with its log) and restart it."""
    if target.kind == "direct" or target.alive():
        return None
    code = target.proc.returncode if target.proc else None
    incident = f"{target.name} exited with code {code} during the run; log tail:\n" \
               f"{tail(target.log_path) if target.log_path else ''}"
    log(f"!! {incident}")
    target.stop()
    target.failed = None
    target.start()
    if target.failed:
        log(f"!! restart of {target.name} failed: {target.failed}")
    return incident


def run_point(point: Point, targets: list[Target], reps: int, log: Log,
              incidents: list[str], na: Callable[[Target, Point], str | None]) -> None:
    """Run `point` reps times, alternating over targets."""
    for rep in range(reps):
        for t in targets:
            runs = point.runs.setdefault(t.name, [])
            why_na = na(t, point)
            if why_na:
                point.not_applicable[t.name] = why_na
                continue
            if t.failed:
                runs.append(PgbenchResult(target=t.name, ok=False, rc=None,
                                          errors=[f"target not running: {t.failed.splitlines()[0]}"]).as_dict())
                continue
            res = run_pgbench(t, point.spec)
            runs.append(res.as_dict())
            log(f"  {point.scenario} c={point.clients} rep {rep + 1}/{reps} {t.name}: {_describe(res)}")
            incident = check_alive(t, log)
            if incident:
                incidents.append(f"{point.scenario} c={point.clients} rep {rep + 1}: {incident}")
            time.sleep(0.5)   # let sockets and backends settle between runs


# --------------------------------------------------------------------- idle
def measure_idle(target: Target, count: int, log: Log, timeout: float = 600.0) -> dict:
    """Hold `count` idle logged-in clients on target; memory per client from
    the change in RSS/PSS of its process tree, and the time to connect them."""
    out: dict = {"target": target.name, "count": count}
    if target.failed or not target.pid:
        out["error"] = "target not running: " + ((target.failed or "exited").splitlines() or ["?"])[0]
        return out
    wait_login(target.port, target.proc)          # warm: one server connection, imports done
    time.sleep(0.5)
    before = procstats.memory(target.pid)
    cpu0 = procstats.cpu_seconds(target.pid)
    proc = subprocess.Popen([sys.executable, "-m", "loadtest.idle", "--port", str(target.port),
                             "--count", str(count), "--hold", str(timeout)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env(), start_new_session=True)
    try:
        line = _readline_bounded(proc, timeout)
        if not line:
            why = proc.stderr.read()[-2000:] if proc.poll() is not None else f"nothing within {timeout:.0f}s"
            out["error"] = f"idle client script gave no result: {why}"
            return out
        connected = json.loads(line)
        out.update({k: connected[k] for k in ("connected", "failed", "seconds", "errors")})
        out["cpu_seconds"] = round(procstats.cpu_seconds(target.pid) - cpu0, 3) if target.pid else None
        time.sleep(1.0)                           # let allocations settle before reading memory
        after = procstats.memory(target.pid) if target.pid else None
        out["still_serving"] = wait_login(target.port, target.proc, timeout=10) is None
        if after:
            n = max(1, connected["connected"])
            out.update({
                "processes": after.processes,
                "rss_before_kb": before.rss_kb, "rss_after_kb": after.rss_kb,
                "pss_before_kb": before.pss_kb, "pss_after_kb": after.pss_kb,
                "rss_kb_per_client": round((after.rss_kb - before.rss_kb) / n, 2),
                "pss_kb_per_client": round((after.pss_kb - before.pss_kb) / n, 2),
            })
        else:
            out["error"] = f"{target.name} died while holding idle clients"
        proc.stdin.write("release\n")
        proc.stdin.flush()
        released = _readline_bounded(proc, 60)
        if released:
            out["dropped_while_idle"] = json.loads(released).get("dropped")
    finally:
        _stop_child(proc)
    log(f"  idle {target.name}: {_describe_idle(out)}")
    return out


def _describe_idle(r: dict) -> str:
    if "error" in r:
        return f"FAILED {r['error'][:300]}"
    return (f"{r['connected']}/{r['count']} connected in {r['seconds']} s, "
            f"{r.get('pss_kb_per_client')} KB PSS/client ({r.get('rss_kb_per_client')} KB RSS), "
            f"dropped {r.get('dropped_while_idle')}, still serving {r.get('still_serving')}")


def _readline_bounded(proc: subprocess.Popen, timeout: float) -> str:
    """One stdout line from proc, or '' if none within timeout."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if sel.select(timeout):
            return proc.stdout.readline().strip()
        return ""
    finally:
        sel.close()


def _stop_child(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def write_select1(workdir: Path) -> str:
    """The script of the latency scenario: the cheapest possible round trip."""
    path = workdir / "select1.sql"
    path.write_text("SELECT 1;\n")
    return str(path)

"""Turn raw benchmark runs into medians, paired ratios, goal verdicts,
report.md, report.json and tps.png."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

from .targets import REPO_ROOT

IDLE_GOAL_CLIENTS = 10000
IDLE_GOAL_KB = 16.0


# ----------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        return round(kb / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        return 0.0


def _cmd_out(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10,
                              cwd=REPO_ROOT).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict:
    import pooler
    rev = _cmd_out(["git", "rev-parse", "--short", "HEAD"])
    dirty = bool(_cmd_out(["git", "status", "--porcelain", "--untracked-files=no"]))
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "memory_gb": _mem_total_gb(),
        "python": platform.python_version(),
        "pooler_version": getattr(pooler, "__version__", "?"),
        "git_revision": rev + ("+dirty" if dirty and rev else ""),
        "pgbench": _cmd_out(["pgbench", "--version"]),
    }


# ------------------------------------------------------------------ numbers
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def median_of(runs: list[dict], key: str) -> float | None:
    return _median([r[key] for r in runs if r.get("ok") and r.get(key) is not None])


def paired(a: list[dict], b: list[dict], key: str = "tps", op: str = "ratio") -> list[float]:
    """Per repetition a/b (or a-b) where both runs succeeded."""
    out = []
    for ra, rb in zip(a, b):
        if ra.get("ok") and rb.get("ok") and ra.get(key) is not None and rb.get(key):
            out.append(ra[key] / rb[key] if op == "ratio" else ra[key] - rb[key])
    return out


def summarize_point(point: dict, pooler_names: list[str]) -> dict:
    """Medians per target and, per pooler target, median of paired ratios."""
    runs = point["runs"]
    s: dict = {"median_tps": {}, "failures": {}, "ratios": {}}
    for name, rs in runs.items():
        s["median_tps"][name] = median_of(rs, "tps")
        failed = [r for r in rs if not r.get("ok")]
        if failed:
            s["failures"][name] = {"failed_runs": len(failed), "runs": len(rs),
                                   "errors": failed[0].get("errors", [])[:3]}
    for p in pooler_names:
        for ref in ("pgbouncer", "direct"):
            if p in runs and ref in runs and runs[ref]:
                ratios = paired(runs[p], runs[ref])
                s["ratios"][f"{p}/{ref}"] = {"median": _median(ratios),
                                             "per_rep": [round(x, 3) for x in ratios]}
    return s


def summarize_latency(point: dict, pooler_names: list[str]) -> dict:
    runs = point["runs"]
    out: dict = {"p50_ms": {}, "p99_ms": {}, "added_over_direct_ms": {}}
    for name, rs in runs.items():
        out["p50_ms"][name] = median_of(rs, "p50_ms")
        out["p99_ms"][name] = median_of(rs, "p99_ms")
    for name in [n for n in runs if n != "direct"]:
        if "direct" in runs:
            out["added_over_direct_ms"][name] = {
                "p50": _median(paired(runs[name], runs["direct"], "p50_ms", "diff")),
                "p99": _median(paired(runs[name], runs["direct"], "p99_ms", "diff"))}
    return out


def summarize_cpu(point: dict, pooler_names: list[str]) -> dict:
    runs = point["runs"]
    out: dict = {"clients": point["clients"], "us_per_tx": {}, "ratio_to_pgbouncer": {}}
    for name, rs in runs.items():
        if name != "direct":
            out["us_per_tx"][name] = median_of(rs, "cpu_us_per_tx")
    for p in pooler_names:
        if "pgbouncer" in runs:
            out["ratio_to_pgbouncer"][p] = _median(paired(runs[p], runs["pgbouncer"], "cpu_us_per_tx"))
    return out


def summarize(data: dict) -> dict:
    pooler_names = [n for n, t in data["targets"].items() if t["kind"] == "pooler"]
    summary: dict = {"points": [], "latency": None, "cpu": None}
    for point in data["points"]:
        s = summarize_point(point, pooler_names)
        s.update({"scenario": point["scenario"], "clients": point["clients"],
                  "not_applicable": point["not_applicable"]})
        summary["points"].append(s)
        if point["scenario"] == "latency":
            summary["latency"] = summarize_latency(point, pooler_names)
    cpu_point = _cpu_point(data["points"])
    if cpu_point and "cpu" in data["settings"]["scenarios"]:
        summary["cpu"] = summarize_cpu(cpu_point, pooler_names)
    tls_point = next((p for p in data["points"] if p["scenario"] == "tls"), None)
    if tls_point:
        summary["cpu_tls"] = summarize_cpu(tls_point, pooler_names)
    summary["goals"] = goals(data, summary, pooler_names)
    return summary


def _cpu_table(L: list[str], cpu: dict, what: str) -> None:
    L.append(f"## CPU per transaction ({what}, {cpu['clients']} clients)")
    L.append("")
    L.append("utime+stime of every process of the target (master and workers) during the run, "
             "divided by transactions.")
    L.append("")
    L.append("| target | µs CPU per transaction | ratio to PgBouncer |")
    L.append("| --- | --- | --- |")
    for n, v in cpu["us_per_tx"].items():
        r = cpu["ratio_to_pgbouncer"].get(n)
        L.append(f"| {n} | {_fmt(v, 1)} | {'—' if n == 'pgbouncer' else _fmt(r, unit='×')} |")
    L.append("")


def _cpu_point(points: list[dict]) -> dict | None:
    """The select run at 64 clients (else the largest select run measured)."""
    selects = [p for p in points if p["scenario"] == "select"]
    exact = [p for p in selects if p["clients"] == 64]
    if exact:
        return exact[0]
    return max(selects, key=lambda p: p["clients"]) if selects else None


def _find(summary: dict, scenario: str, clients: int) -> dict | None:
    for s in summary["points"]:
        if s["scenario"] == scenario and s["clients"] == clients:
            return s
    return None


def _fmt(x: float | None, digits: int = 2, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def goals(data: dict, summary: dict, pooler_names: list[str]) -> list[dict]:
    """The four targets of the project, per pooler target: met / NOT met / not measured."""
    out = []
    for p in pooler_names:
        out += [_goal_select64(summary, p), _goal_select2000(data, summary, p),
                _goal_churn(summary, p), _goal_idle(data, p)]
    return out


def _goal_select64(summary: dict, p: str) -> dict:
    s = _find(summary, "select", 64)
    r = s["ratios"].get(f"{p}/pgbouncer", {}).get("median") if s else None
    return _goal(p, "select, 64 clients: ≥ 0.8× PgBouncer tps", None if r is None else r >= 0.8,
                 _fmt(r, unit="×"))


def _goal_select2000(data: dict, summary: dict, p: str) -> dict:
    goal = "select, 2000 clients: no failed connections and ≥ PgBouncer tps"
    s = _find(summary, "select", 2000)
    if not s:
        return _goal(p, goal, None, "not run")
    fail = s["failures"].get(p)
    r = s["ratios"].get(f"{p}/pgbouncer", {}).get("median")
    point = next(pt for pt in data["points"] if pt["scenario"] == "select" and pt["clients"] == 2000)
    conn_err = sum(x.get("connection_errors", 0) + x.get("aborted_clients", 0)
                   for x in point["runs"].get(p, []))
    met = None if (r is None and not fail) else (not fail and r is not None and r >= 1.0)
    return _goal(p, goal, met, f"{_fmt(r, unit='×')}, failed runs {fail['failed_runs'] if fail else 0}, "
                               f"connection errors/aborted clients {conn_err}")


def _goal_churn(summary: dict, p: str) -> dict:
    s = next((s for s in summary["points"] if s["scenario"] == "churn"), None)
    r = s["ratios"].get(f"{p}/direct", {}).get("median") if s else None
    return _goal(p, "churn (-C): ≥ 5× direct PostgreSQL tps", None if r is None else r >= 5.0,
                 _fmt(r, unit="×"))


def _goal_idle(data: dict, p: str) -> dict:
    goal = "10k idle clients: ≤ 16 KB per client"
    idle = (data.get("idle") or {}).get(p)
    if not idle or "pss_kb_per_client" not in idle:
        return _goal(p, goal, None, (idle or {}).get("error", "not run")[:200])
    kb, n = idle["pss_kb_per_client"], idle["count"]
    note = f"{kb:.1f} KB PSS/client at {idle['connected']}/{n} clients"
    if n < IDLE_GOAL_CLIENTS:
        note += f" (measured at {n}, not {IDLE_GOAL_CLIENTS})"
    return _goal(p, goal, idle["failed"] == 0 and kb <= IDLE_GOAL_KB, note)


def _goal(target: str, goal: str, met: bool | None, measured: str) -> dict:
    verdict = "not measured" if met is None else ("met" if met else "NOT met")
    return {"target": target, "goal": goal, "measured": measured, "verdict": verdict}


# ----------------------------------------------------------------- markdown
def _cell(summary_point: dict, name: str) -> str:
    if name in summary_point["not_applicable"]:
        return "n/a"
    fail = summary_point["failures"].get(name)
    tps = summary_point["median_tps"].get(name)
    if fail and fail["failed_runs"] == fail["runs"]:
        return f"FAILED ({fail['failed_runs']}/{fail['runs']})"
    text = "—" if tps is None else f"{tps:,.0f}"
    if fail:
        text += f" ({fail['failed_runs']}/{fail['runs']} failed)"
    return text


def markdown(data: dict, summary: dict) -> str:
    m, st = data["machine"], data["settings"]
    names = list(data["targets"])
    poolers = [n for n in names if data["targets"][n]["kind"] == "pooler"]
    L: list[str] = []
    L.append(f"# Pooler benchmark — {data['date']}")
    L.append("")
    if data.get("interrupted"):
        L.append("**Interrupted: a partial report of the runs finished so far.**")
        L.append("")
    L.append(f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB RAM, Linux {m['kernel']}")
    L.append(f"- Versions: pooler {m['pooler_version']} (git {m['git_revision'] or '?'}), "
             f"PostgreSQL {data['versions']['postgresql']}, {data['versions']['pgbouncer']}, "
             f"{m['pgbench']}, Python {m['python']}")
    L.append(f"- Settings: {st['reps']} repetition(s) × {st['seconds']} s per run, pgbench scale {st['scale']}, "
             f"transaction pooling, pool size {st['pool_size']}, max_client_conn {st['max_client_conn']}, "
             f"PostgreSQL max_connections {st['max_connections']}, pooler workers {st['workers']}"
             f"{', quick mode' if st['quick'] else ''}")
    L.append(f"- Targets run alternately (A/B/C/A/B/C…): {', '.join(names)}. Ratios are the median of "
             "per-repetition ratios; tps is the median over repetitions. The machine is shared and noisy: "
             "read differences under ~10% as noise.")
    L.append("")
    L.append("## Goals")
    L.append("")
    L.append("| target | goal | measured | verdict |")
    L.append("| --- | --- | --- | --- |")
    for g in summary["goals"]:
        L.append(f"| {g['target']} | {g['goal']} | {g['measured']} | **{g['verdict']}** |")
    L.append("")
    tps_points = [s for s in summary["points"] if s["scenario"] != "latency"]
    if tps_points:
        L.append("## Throughput (pgbench tps)")
        L.append("")
        head = ["scenario", "clients", *names]
        for p in poolers:
            head += [f"{p}/pgbouncer", f"{p}/direct"]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + " --- |" * len(head))
        for s in tps_points:
            row = [s["scenario"], str(s["clients"]), *(_cell(s, n) for n in names)]
            for p in poolers:
                for ref in ("pgbouncer", "direct"):
                    r = s["ratios"].get(f"{p}/{ref}", {}).get("median")
                    row.append("n/a" if r is None else f"{r:.2f}×")
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        L.append("Scenarios: `select` = `pgbench -S` (simple protocol); `extended`/`prepared` = "
                 "`-S -M extended|prepared`; `tpcb` = built-in TPC-B-like; `churn` = `-S -C` "
                 "(a new connection per transaction) with md5 login; `churn_scram` = the same with SCRAM "
                 "login (bounded by libpq's client-side PBKDF2 for every target); `tls` = `-S` with "
                 "`sslmode=require` (TLS between pgbench and the target; a throwaway self-signed "
                 "certificate; servers stay plain). "
                 f"pgbench logs in with {st.get('pgbench_auth', 'md5')} unless the scenario says otherwise. "
                 "n/a: more clients than PostgreSQL's max_connections.")
        L.append("")
    if summary.get("latency"):
        lat = summary["latency"]
        L.append("## Latency (1 client, `SELECT 1`, pgbench -l)")
        L.append("")
        L.append("| target | p50 ms | p99 ms | added p50 over direct | added p99 over direct |")
        L.append("| --- | --- | --- | --- | --- |")
        for n in names:
            add = lat["added_over_direct_ms"].get(n, {})
            L.append(f"| {n} | {_fmt(lat['p50_ms'].get(n), 3)} | {_fmt(lat['p99_ms'].get(n), 3)} | "
                     f"{_fmt(add.get('p50'), 3) if add else '—'} | {_fmt(add.get('p99'), 3) if add else '—'} |")
        L.append("")
    for key, what in (("cpu", "select"), ("cpu_tls", "select over client TLS")):
        if summary.get(key):
            _cpu_table(L, summary[key], what)
    if data.get("idle"):
        L.append(f"## Idle connections ({st['idle_clients']} logged-in idle clients)")
        L.append("")
        L.append("Opened by `loadtest/idle.py` (asyncio, startup + SCRAM, 100 logins in flight); memory is "
                 "(after − before) / connected, summed over the target's processes; each target started fresh.")
        L.append("")
        L.append("| target | connected | failed | time to connect s | RSS KB/client | PSS KB/client | "
                 "dropped while idle | still serving |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for n, r in data["idle"].items():
            if "error" in r:
                L.append(f"| {n} | FAILED: {r['error'][:150]} | | | | | | |")
                continue
            L.append(f"| {n} | {r['connected']} | {r['failed']} | {r['seconds']} | {r.get('rss_kb_per_client')} | "
                     f"{r.get('pss_kb_per_client')} | {r.get('dropped_while_idle')} | {r.get('still_serving')} |")
        L.append("")
    problems = _problems(data, summary)
    L.append("## Failures and incidents")
    L.append("")
    L.extend(problems or ["None."])
    L.append("")
    return "\n".join(L)


def _problems(data: dict, summary: dict) -> list[str]:
    lines = []
    for name, t in data["targets"].items():
        if t.get("failed"):
            lines.append(f"- **{name}** did not start: `{t['failed'].splitlines()[0]}`")
    for s in summary["points"]:
        for name, f in s["failures"].items():
            errs = "; ".join(f"`{e[:200]}`" for e in f["errors"]) or "no error text"
            lines.append(f"- {s['scenario']} c={s['clients']}: **{name}** failed "
                         f"{f['failed_runs']}/{f['runs']} runs: {errs}")
    for name, r in (data.get("idle") or {}).items():
        if "error" in r:
            lines.append(f"- idle: **{name}**: {r['error'][:300]}")
        elif r.get("failed"):
            lines.append(f"- idle: **{name}**: {r['failed']} logins failed: {r.get('errors')}")
    for inc in data.get("incidents", []):
        lines.append(f"- incident: {inc.splitlines()[0]}")
    return lines


# --------------------------------------------------------------------- plot
def plot_tps(data: dict, summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [s for s in summary["points"] if s["scenario"] == "select"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in data["targets"]:
        xs = [s["clients"] for s in pts if s["median_tps"].get(name) is not None
              and name not in s["not_applicable"]]
        ys = [s["median_tps"][name] for s in pts if s["clients"] in xs]
        if xs:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("pgbench clients (-S, simple protocol)")
    ax.set_ylabel("transactions per second (median)")
    ax.set_title(f"tps vs clients — {data['machine']['nproc']} CPUs, {data['date'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    if pts:
        ax.set_xticks(sorted({s["clients"] for s in pts}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(data: dict, outdir: Path) -> tuple[str, dict]:
    """Write report.json, report.md and tps.png; return (markdown, summary)."""
    outdir.mkdir(parents=True, exist_ok=True)
    summary = summarize(data)
    data = {**data, "summary": summary}
    (outdir / "report.json").write_text(json.dumps(data, indent=2, default=str))
    md = markdown(data, summary)
    (outdir / "report.md").write_text(md)
    plot_tps(data, summary, outdir / "tps.png")
    return md, summary


def main(argv: list[str] | None = None) -> int:
    """Re-render report.md and tps.png of a report directory from its report.json."""
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m loadtest.report REPORT_DIR", file=sys.stderr)
        return 2
    outdir = Path(args[0])
    data = json.loads((outdir / "report.json").read_text())
    data.pop("summary", None)
    md, _ = write(data, outdir)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Smoke tests of the load-test tooling (loadtest/): both commands run end to
end against a real PostgreSQL, the pooler and PgBouncer, in about a minute."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _explain(cp: subprocess.CompletedProcess) -> str:
    return f"exit {cp.returncode}\n--- stdout\n{cp.stdout[-4000:]}\n--- stderr\n{cp.stderr[-4000:]}"


@pytest.mark.timeout(180)
def test_locust_runner_passes_and_invariant_holds(tmp_path):
    cp = _run(["loadtest.run_locust", "--users", "10", "--seconds", "5", "--out", str(tmp_path)],
              timeout=170)
    assert cp.returncode == 0, _explain(cp)
    assert "invariant holds" in cp.stdout, _explain(cp)
    assert (tmp_path / "locust_stats.csv").exists()
    assert (tmp_path / "locust.html").exists()
    stats = json.loads((tmp_path / "locust.json").read_text())
    assert sum(s["num_requests"] for s in stats) > 0
    assert sum(s["num_failures"] for s in stats) == 0


@pytest.mark.timeout(180)
def test_bench_quick_writes_reports(tmp_path):
    if not shutil.which("pgbench"):
        pytest.skip("pgbench not installed")
    out = tmp_path / "report"
    cp = _run(["loadtest.bench", "--quick", "--out", str(out)], timeout=170)
    assert cp.returncode == 0, _explain(cp)
    for name in ("report.md", "report.json", "tps.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "report.json").read_text())
    assert {p["scenario"] for p in data["points"]} >= {"select", "prepared", "churn"}
    assert "# Pooler benchmark" in cp.stdout          # the markdown goes to stdout
    # Direct PostgreSQL must work; otherwise the numbers mean nothing.
    select = next(p for p in data["points"] if p["scenario"] == "select")
    assert all(r["ok"] for r in select["runs"]["direct"]), select["runs"]["direct"]
    # And the pooler must have served pgbench (a broken pooler still gives a report, exit 0).
    assert all(r["ok"] for r in select["runs"]["pooler-w1"]), select["runs"]["pooler-w1"]


def test_bench_baseline_imports_the_baseline_checkout(tmp_path):
    """--baseline CHECKOUT must run that checkout's pooler even when the benchmark runs
    from this one (where `python -m pooler` would find this checkout's first)."""
    from loadtest.targets import PoolerTarget, PoolSettings
    base = tmp_path / "base"
    (base / "pooler").mkdir(parents=True)
    (base / "pooler" / "__init__.py").write_text("")
    (base / ".venv" / "bin").mkdir(parents=True)
    (base / ".venv" / "bin" / "python").symlink_to(sys.executable)
    target = PoolerTarget(None, tmp_path, 1, PoolSettings(pool_size=1), "", "base", base)
    python, env, cwd = target.command_env()
    cp = subprocess.run([python, "-c", "import pooler; print(pooler.__file__)"], env=env,
                        cwd=cwd, capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == str(base / "pooler" / "__init__.py"), cp.stdout
